#!/usr/bin/env python3
"""What a gateway loses when it is killed with SIGKILL (issue #13): usage counted with
the store against the requests its clients got an answer to.

    load-tests/usage_loss.py                          # 5 kills, flush_interval 1s
    load-tests/usage_loss.py --kills 10 --flush-interval 5s --keygate target/debug/keygate

One machine, loopback: a standalone node on a SQLite file (admin API and store), a
gateway following it with `usage.spool` and `{type: control_plane}`, a tiny upstream,
and C client threads sending requests through the gateway with K keys. In each round
the clients run for a few seconds, then the gateway gets SIGKILL at a random instant
and is started again (the clients wait for it). At the end the gateway is stopped with
SIGTERM and the store's usage totals are compared with the answers the clients got
(a request whose connection broke at the kill is not counted on either side).

The spool keeps every closed window, so a kill loses at most the window still open: at
most `flush_interval` of traffic. The script reports the requests lost per kill and that
loss in windows' worth of traffic (lost / (request rate × flush_interval)). Prints a
table and writes it as markdown (--out). Python 3.9+, standard library only.
"""

import argparse
import datetime
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ADMIN_TOKEN = "usage-loss-admin-token"
SYNC_TOKEN = "usage-loss-sync-token"


def parse_seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


class Admin:
    def __init__(self, port):
        self.port = port

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status not in (200, 201):
            sys.exit(f"admin API {method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data)


class Client(threading.Thread):
    """Sends requests back to back with its keys; counts the answers it gets."""

    def __init__(self, port, keys):
        super().__init__(daemon=True)
        self.port, self.keys = port, keys
        self.answered = {}  # key -> answers with a status
        self.running = threading.Event()
        self.running.set()
        self.stopped = False
        self.conn = None

    def run(self):
        i = 0
        while not self.stopped:
            if not self.running.is_set():
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                self.running.wait(0.05)
                continue
            key = self.keys[i % len(self.keys)]
            i += 1
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                self.conn.request("GET", "/v1/orders/1", headers={"x-api-key": key})
                response = self.conn.getresponse()
                response.read()
                if response.status == 200:
                    self.answered[key] = self.answered.get(key, 0) + 1
                else:
                    # 503 not_ready while the gateway starts: not a request with a known key.
                    time.sleep(0.01)
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keygate", default=str(REPO / "target/release/keygate"))
    parser.add_argument("--kills", type=int, default=5, help="rounds, each ending in a SIGKILL (default 5)")
    parser.add_argument("--flush-interval", default="1s", help="the gateway's usage.flush_interval (default 1s)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--keys", type=int, default=20, help="keys the clients use (default 20)")
    parser.add_argument("--round", type=float, default=4.0,
                        help="seconds of load before each kill, plus up to one flush interval at random")
    parser.add_argument("--out", help="markdown (default load-tests/results/usage-loss.md)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not os.path.exists(args.keygate):
        sys.exit(f"{args.keygate} does not exist: build it with `cargo build --release --bin keygate`")
    args.keygate = os.path.abspath(args.keygate)
    flush = parse_seconds(args.flush_interval)
    rng = random.Random(args.seed)
    harness.exit_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="keygate-usage-loss-"))
    children = harness.Children(workdir)
    env = dict(os.environ, ADMIN_TOKEN=ADMIN_TOKEN, SYNC_TOKEN=SYNC_TOKEN, KEYGATE_LOG="warn")
    ports = {name: harness.free_port() for name in ("upstream", "admin", "gw_proxy", "gw_admin")}
    upstream = harness.start_upstream(ports["upstream"])
    clients = []
    try:
        (workdir / "node.yaml").write_text(f"""mode: control-plane
node_id: store
admin:
  address: 127.0.0.1:{ports['admin']}
  tokens: [ {{ name: ops, token: "${{env:ADMIN_TOKEN}}" }} ]
  sync_tokens: [ {{ name: edge, token: "${{env:SYNC_TOKEN}}" }} ]
store: {{ url: "sqlite://{workdir}/store.db" }}
""")
        children.start("control-plane", [args.keygate, "serve", "-c", str(workdir / "node.yaml")], env)
        harness.wait_http(ports["admin"], "/healthz", alive=children.check_alive)
        admin = Admin(ports["admin"])
        keys = {}
        for n in range(args.keys):
            created = admin.call("POST", "/v1/keys", {"name": f"loss {n}"})
            keys[created["key"]] = created["record"]["id"]
        (workdir / "gateway.yaml").write_text(f"""mode: gateway
node_id: gw
threads: 1
listeners: [ {{ address: 127.0.0.1:{ports['gw_proxy']} }} ]
admin: {{ address: 127.0.0.1:{ports['gw_admin']} }}
keys:
  source: control_plane
  control_plane: {{ url: "http://127.0.0.1:{ports['admin']}", token: "${{env:SYNC_TOKEN}}" }}
  cache_file: {workdir}/keys.snapshot
upstreams:
  api: {{ targets: ["127.0.0.1:{ports['upstream']}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api }}
usage:
  flush_interval: {args.flush_interval}
  spool: {workdir}/usage.spool
  sinks: [ {{ type: control_plane }} ]
access_log: off
""")

        def start_gateway(name):
            children.start(name, [args.keygate, "serve", "-c", str(workdir / "gateway.yaml")], env)
            harness.wait_http(ports["gw_admin"], "/readyz", timeout=60, alive=children.check_alive)

        start_gateway("gateway-0")
        raw = list(keys)
        share = max(1, len(raw) // args.clients)
        clients = [Client(ports["gw_proxy"], raw[i * share:(i + 1) * share] or raw) for i in range(args.clients)]
        for c in clients:
            c.start()

        rounds = []
        for n in range(1, args.kills + 1):
            before = sum(sum(c.answered.values()) for c in clients)
            started = time.monotonic()
            time.sleep(args.round + rng.uniform(0, flush))
            at = sum(sum(c.answered.values()) for c in clients)
            took = time.monotonic() - started
            # SIGKILL: the process group gets no chance to flush anything.
            name = f"gateway-{n - 1}"
            for i, (known, popen, _) in enumerate(children.procs):
                if known == name:
                    os.killpg(popen.pid, 9)
                    popen.wait()
                    del children.procs[i]
                    break
            rate = (at - before) / took
            rounds.append({"round": n, "rate": rate})
            print(f"round {n}: {rate:,.0f} answered requests/s, SIGKILL after {took:.2f} s", flush=True)
            start_gateway(f"gateway-{n}")
        time.sleep(args.round)
        for c in clients:
            c.stopped = True
        for c in clients:
            c.join()
        children.stop(f"gateway-{args.kills}")

        sent = {}
        for c in clients:
            for key, count in c.answered.items():
                sent[key] = sent.get(key, 0) + count
        total_sent = sum(sent.values())
        # The control plane has taken the final flush: SIGTERM returns after it.
        counted = 0
        for key, key_id in keys.items():
            counted += admin.call("GET", f"/v1/keys/{key_id}/usage")["totals"]["requests"]
        lost = total_sent - counted
        rate = statistics.median(r["rate"] for r in rounds)
        per_kill = lost / args.kills
        windows = per_kill / (rate * flush) if rate else 0.0
        print(f"answered {total_sent:,}, counted {counted:,}: {lost:,} lost over {args.kills} kills", flush=True)
    finally:
        for c in clients:
            c.stopped = True
        children.stop_all(timeout=30)
        upstream.shutdown()

    commit = harness.git_describe(REPO)
    command = "load-tests/usage_loss.py " + " ".join(sys.argv[1:])
    lines = [
        "# Usage lost to SIGKILL, with `usage.spool`",
        "",
        f"`{command}` on {datetime.date.today()}; {harness.machine()}; {commit}.",
        "",
        "| what | measured |",
        "|---|---|",
        f"| requests answered through the gateway | {total_sent:,} ({args.clients} clients, {args.keys} keys) |",
        f"| requests counted in the store | {counted:,} |",
        f"| SIGKILLs | {args.kills} (each after {args.round:g} s + up to one flush interval) |",
        f"| requests lost per kill | {per_kill:,.1f} (median rate {rate:,.0f} requests/s) |",
        f"| lost per kill, in windows of traffic (flush_interval {args.flush_interval}) | {windows:.2f} "
        "(bound: 1, the window still open) |",
        f"| counted twice | {'none' if lost >= 0 else f'{-lost:,} more counted than answered'} |",
    ]
    text = "\n".join(lines) + "\n"
    harness.publish(text, Path(args.out or HERE / "results" / "usage-loss.md"))
    shutil.rmtree(workdir, ignore_errors=True)
    if lost < 0:
        sys.exit("more requests counted than answered: a batch was counted twice")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
