#!/usr/bin/env python3
"""How closely a fleet of gateways holds one key's rate limit (issue #14, point 3).

    load-tests/fleet_accuracy.py                                   # 1, 2 and 4 gateways, 30 s per case
    load-tests/fleet_accuracy.py --gateways 4 --cases spread --duration 10
    load-tests/fleet_accuracy.py --keygate target/debug/keygate --duration 3 --limit 20   # a quick check

One machine, everything on loopback: a `redis-server` of the script's own (or
--redis-url), a tiny upstream, and G `keygate serve` gateways in gateway mode with
`fleet_limits` on that Redis, each with a keys file holding one key limited to L
requests a second (burst L, the default). A load generator offers 10 x L requests a
second for the duration, round-robin over the gateways, in three cases:

 (a) spread:  every request to the next gateway in turn;
 (b) moving:  all requests to one gateway, moving to the next every 2 s;
 (c) bursts:  in every second, the second's 10 x L requests as fast as they go in its
              first 100 ms, then nothing; round-robin.

Each case runs on fresh gateways and a fresh key, so no state carries over. A perfect
limiter allows burst + floor(L x span), span being the time from the first to the last request
sent; the table puts the requests allowed (200s) beside that ideal. Any answer other than
200 or 429 `rate_limited` is counted and reported as an error.

Prints the table and writes it as markdown (--out). Every process started is stopped on
exit, failure, Ctrl-C or SIGTERM; the work directory (configs, logs) is removed unless
--keep-workdir (a failed run keeps it, and says where). Needs a keygate build, Python
3.9+, and `redis-server` unless --redis-url is given.
"""

import argparse
import datetime
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CASES = ["spread", "moving", "bursts"]
MOVE_EVERY = 2.0  # seconds on one gateway in case (b)
BURST_WINDOW = 0.1  # seconds of each second that carry its requests in case (c)
# The targets with 4 gateways: (a) and (b) within 10 %, (c) within 20 %.
TARGETS = {"spread": 0.10, "moving": 0.10, "bursts": 0.20}


def due_times(case, rate, duration):
    """When each request is due, in seconds from the start."""
    count = int(rate * duration)
    if case != "bursts":
        return [i / rate for i in range(count)]
    per_second = int(rate)
    return [int(i // per_second) + (i % per_second) * BURST_WINDOW / per_second for i in range(count)]


def gateway_for(case, index, due, gateways):
    if case == "moving":
        return int(due // MOVE_EVERY) % gateways
    return index % gateways


class Load:
    """Sends the scheduled requests from `workers` threads, each with one keep-alive
    connection per gateway; a request waits for its due time, never for another."""

    def __init__(self, ports, key, case, rate, duration, workers):
        self.ports, self.key, self.case = ports, key, case
        self.due = due_times(case, rate, duration)
        self.workers = workers
        self.next = 0
        self.lock = threading.Lock()
        self.allowed = self.limited = 0
        self.errors = {}
        self.sent_at = []

    def take(self):
        with self.lock:
            if self.next >= len(self.due):
                return None
            index = self.next
            self.next += 1
            return index

    def record(self, status, at):
        with self.lock:
            self.sent_at.append(at)
            if status == 200:
                self.allowed += 1
            elif status == 429:
                self.limited += 1
            else:
                self.errors[status] = self.errors.get(status, 0) + 1

    def worker(self, start):
        connections = {}
        headers = {"x-api-key": self.key}
        while (index := self.take()) is not None:
            due = self.due[index]
            wait = start + due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            port = self.ports[gateway_for(self.case, index, due, len(self.ports))]
            at = time.monotonic() - start
            for attempt in (1, 2):
                conn = connections.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connections[port] = conn
                try:
                    conn.request("GET", "/v1/orders", headers=headers)
                    response = conn.getresponse()
                    body = response.read()
                    status = response.status
                    if status == 429 and b"rate_limited" not in body:
                        status = f"429 {body[:60]!r}"
                    break
                except (OSError, http.client.HTTPException) as e:
                    # A connection the gateway closed while idle is opened again once.
                    conn.close()
                    connections.pop(port, None)
                    status = f"{type(e).__name__}"
                    if attempt == 2:
                        break
            self.record(status, at)
        for conn in connections.values():
            conn.close()

    def run(self):
        start = time.monotonic() + 0.2
        threads = [threading.Thread(target=self.worker, args=(start,), daemon=True) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        span = (max(self.sent_at) - min(self.sent_at)) if self.sent_at else 0.0
        return span


class Fleet:
    def __init__(self, args, workdir):
        self.args, self.workdir = args, workdir
        self.children = harness.Children(workdir)
        self.upstream = None
        self.redis_url = args.redis_url
        self.rows = []

    def setup(self):
        port = harness.free_port()
        self.upstream = harness.start_upstream(port)
        self.upstream_port = port
        if not self.redis_url:
            if shutil.which("redis-server") is None:
                sys.exit("redis-server is not installed: install it or pass --redis-url")
            redis_port = harness.free_port()
            self.children.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"])
            self.redis_url = f"redis://127.0.0.1:{redis_port}"
            deadline = time.monotonic() + 10
            while not port_open(redis_port):
                self.children.check_alive()
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not listen within 10 s")
                time.sleep(0.05)

    def new_key(self, name):
        out = subprocess.run([self.args.keygate, "gen-key"], check=True, capture_output=True, text=True).stdout
        raw, digest = out.split()[:2]
        key_id = f"key_{name}_{os.getpid()}_{time.time_ns()}"
        keys = self.workdir / f"keys-{name}.yaml"
        keys.write_text(f"keys:\n  - id: {key_id}\n    hash: \"{digest}\"\n    scopes: [orders:read]\n"
                        f"    rate_limit: {{ requests: {self.args.limit}, per: 1s }}\n")
        return raw, keys

    def start_gateways(self, name, count, keys):
        ports = []
        for i in range(count):
            port, admin = harness.free_port(), harness.free_port()
            config = self.workdir / f"{name}-gw{i}.yaml"
            config.write_text(f"""mode: gateway
node_id: {name}-gw{i}
threads: 1
listeners:
  - address: 127.0.0.1:{port}
admin:
  address: 127.0.0.1:{admin}
keys:
  source: file
  file: {keys}
upstreams:
  api: {{ targets: ["127.0.0.1:{self.upstream_port}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api, scopes: [orders:read] }}
fleet_limits: {{ engine: redis, url: "{self.redis_url}", sync_interval: {self.args.sync_interval} }}
access_log: off
""")
            self.children.start(f"{name}-gw{i}", [self.args.keygate, "serve", "-c", str(config)],
                                cpus=self.args.gateway_cpus)
            harness.wait_http(admin, "/readyz", alive=self.children.check_alive)
            ports.append((port, admin))
        return ports

    def run_case(self, gateways, case):
        name = f"g{gateways}-{case}"
        raw, keys = self.new_key(name)
        ports = self.start_gateways(name, gateways, keys)
        # Let every gateway reach Redis once before the load starts.
        time.sleep(0.5)
        rate = 10 * self.args.limit
        load = Load([p for p, _ in ports], raw, case, rate, self.args.duration, self.args.workers)
        span = load.run()
        metrics = [scrape(admin) for _, admin in ports]
        for i in range(gateways):
            self.children.stop(f"{name}-gw{i}")
        limit = self.args.limit
        # GCRA lets the burst through at once, then one request every 1/L s of the span.
        ideal = limit + int(limit * span)
        sent = load.allowed + load.limited + sum(load.errors.values())
        row = {
            "gateways": gateways, "case": case, "sent": sent, "offered": sent / span if span else 0.0,
            "allowed": load.allowed, "ideal": ideal, "error": (load.allowed - ideal) / ideal,
            "other": load.errors,
            "sync_errors": sum(m.get('keygate_fleet_limits_sync_total{result="error"}', 0) for m in metrics),
            "fallback": max(m.get("keygate_fleet_limits_local_fallback", 0) for m in metrics),
        }
        self.rows.append(row)
        print(f"{gateways} gateway(s), {case}: sent {sent} ({row['offered']:.0f}/s over {span:.1f} s), "
              f"allowed {load.allowed}, ideal {ideal}, error {row['error']:+.1%}"
              + (f", other answers {load.errors}" if load.errors else ""), flush=True)

    def cleanup(self):
        self.children.stop_all()
        if self.upstream is not None:
            self.upstream.shutdown()

    def report(self, started_at):
        args = self.args
        lines = [
            f"# Fleet limit accuracy ({started_at:%Y-%m-%d %H:%M})",
            "",
            f"One key limited to L = {args.limit} requests/s (burst {args.limit}), offered 10 x L = "
            f"{10 * args.limit} requests/s for {args.duration:g} s per case, round-robin over the gateways; "
            f"`fleet_limits` on Redis, `sync_interval: {args.sync_interval}`. Ideal: burst + L x span (span: "
            f"first to last request sent). Target with 4 gateways: within 10 % in (a) and (b), 20 % in (c).",
            "",
            f"Machine: {harness.machine()}. keygate: `{args.keygate}`.",
            "",
            "| gateways | case | sent | offered/s | allowed | ideal | error | other answers | failed syncs |",
            "|---:|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in self.rows:
            other = ", ".join(f"{k}: {v}" for k, v in sorted(r["other"].items(), key=str)) or "none"
            lines.append(f"| {r['gateways']} | {r['case']} | {r['sent']} | {r['offered']:.0f} | {r['allowed']} | "
                         f"{r['ideal']} | {r['error']:+.1%} | {other} | {r['sync_errors']:.0f} |")
        short = [r for r in self.rows if r["offered"] < 0.9 * 10 * args.limit and r["case"] != "bursts"]
        if short:
            lines += ["", "The generator fell short of the offered load in some cases (offered/s below 10 x L): "
                          "lower --limit or raise --workers."]
        return "\n".join(lines) + "\n"


def port_open(port):
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def scrape(admin_port):
    """The admin `/metrics` as {series: value}."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                values[series] = float(value)
            except ValueError:
                pass
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keygate", default=str(REPO / "target/release/keygate"))
    parser.add_argument("--gateways", default="1,2,4", help="gateway counts to run, comma-separated (default 1,2,4)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"cases to run (default {','.join(CASES)})")
    parser.add_argument("--limit", type=int, default=100, help="L, the key's requests per second (default 100)")
    parser.add_argument("--duration", type=float, default=30, help="seconds of load per case (default 30)")
    parser.add_argument("--sync-interval", default="200ms", help="fleet_limits.sync_interval (default 200ms)")
    parser.add_argument("--redis-url", help="an existing Redis or Valkey (default: a redis-server of the script's own)")
    parser.add_argument("--workers", type=int, default=32, help="load generator threads (default 32)")
    parser.add_argument("--gateway-cpus", help="taskset CPU list for the gateways (default: no pinning)")
    parser.add_argument("--out", help="markdown table (default load-tests/results/fleet-accuracy.md)")
    parser.add_argument("--workdir", help="where the work directory goes (default: the system's temp dir)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs afterwards")
    args = parser.parse_args()
    counts = [int(g) for g in args.gateways.split(",") if g.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not counts or min(counts) < 1 or any(c not in CASES for c in cases) or args.limit < 1 or args.duration <= 0:
        sys.exit(f"--gateways takes counts of at least 1, --cases some of {CASES}, --limit and --duration "
                 "positive numbers")
    if not os.path.exists(args.keygate):
        sys.exit(f"{args.keygate} does not exist: build it with `cargo build --release --bin keygate`")
    args.keygate = os.path.abspath(args.keygate)
    out = Path(args.out or HERE / "results" / "fleet-accuracy.md")
    harness.exit_on_signals()

    started_at = datetime.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="keygate-fleet-", dir=args.workdir))
    run = Fleet(args, workdir)
    keep = args.keep_workdir
    try:
        run.setup()
        for gateways in counts:
            for case in cases:
                run.run_case(gateways, case)
    except BaseException as e:
        if not harness.stopped_by_user(e):
            keep = True
        raise
    finally:
        run.cleanup()
        if keep:
            print(f"work directory (configs, logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    text = run.report(started_at)
    harness.publish(text, out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
