#!/usr/bin/env python3
"""Revocation latency: from the admin API's answer to the first 401 at a gateway.

Starts a control plane (SQLite in a temporary directory), a gateway following it
and a small upstream, all on loopback; then, for each round, creates a key,
waits until the gateway accepts it, revokes it and measures how long after the
revoke call returned the gateway's first 401 comes. Prints p50/p99/max.

    load-tests/revocation_latency.py [--keygate target/release/keygate] [--rounds 200]

With --mode standalone the same is measured for one standalone process
(in-process feed). Only the Python standard library is needed.

With --load the rounds run while the gateway serves the load of scenario (c) of
compare.py (see load-tests/README.md): an nginx upstream answering `return 200`,
--keys keys (10,000) created through the admin API with scope orders:read, IP
allowlist 127.0.0.0/8, the default plan `bench` (a rate limit never reached) and
usage counted to a file sink, rotated by wrk with rotate_keys.lua; keygate pinned
to --proxy-cpus, wrk and nginx to --load-cpus. Prints the load's req/s during the
rounds next to the latencies. Needs nginx, wrk and taskset (load-tests/run.sh
installs them with apt-get).

    load-tests/revocation_latency.py --load --rounds 200
    load-tests/revocation_latency.py --load --rounds 200 --mode standalone
"""

import argparse
import collections
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import CLK_TCK, Children, Upstream, free_port, process_ticks, wait_http

HERE = Path(__file__).resolve().parent
ADMIN_TOKEN = "latency-admin-token"
SYNC_TOKEN = "latency-sync-token"
# Scenario (c)'s keys: what every key of the load, and every test key under load, holds.
LOAD_KEY_FIELDS = {"scopes": ["orders:read"], "ip_allowlist": ["127.0.0.0/8"]}
# The plan's rate limit: far above what one core can push, so it is checked but never hit.
NEVER_REACHED_RATE = 1_000_000
# How long one wait (a key becoming accepted, then refused) may take before the run is void.
WAIT_LIMIT_S = 30


def admin(conn, method, path, body=None):
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status >= 300:
        sys.exit(f"admin API {method} {path}: {response.status} {data!r}")
    return json.loads(data) if data else None


def get(conn, key, path="/v1/orders/1"):
    conn.request("GET", path, headers={"x-api-key": key})
    response = conn.getresponse()
    response.read()
    return response


def status_of(conn, key):
    return get(conn, key).status


# --------------------------------------------------------------------------- processes


def find_tool(name):
    # /usr/sbin (nginx) is not on every user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


# --------------------------------------------------------------------------- the load of (c)


def route_outcomes(admin_port, route="orders"):
    """keygate_requests_total of one route, by outcome, from a node's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = collections.Counter()
    for labels, value in re.findall(r"^keygate_requests_total\{([^}]*)\}\s+(\S+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label.get("route") == route:
            out[label.get("outcome", "?")] += int(float(value))
    return out


def start_upstream_nginx(children, nginx, workdir, port, cpus):
    """The upstream of compare.py: one nginx worker answering 200, from its template."""
    text = (HERE / "nginx-upstream.conf.tmpl").read_text()
    # Its echo mode (compare.py's equivalence check) is njs: the module and echo.js.
    (workdir / "echo.js").write_text((HERE / "echo.js").read_text())
    values = {"DIR": workdir, "PORT": port, "NJS_MODULE": "/usr/lib/nginx/modules/ngx_http_js_module.so"}
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", str(value))
    left = sorted(set(re.findall(r"@@[A-Z_]+@@", text)))
    if left:
        sys.exit(f"nginx-upstream.conf.tmpl has placeholders this script does not fill: {', '.join(left)}")
    (workdir / "upstream-tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx-upstream.conf"
    conf.write_text(text)
    # -e: nginx's compiled-in error log (/var/log/nginx) may not be writable by this user.
    argv = [nginx, "-e", str(workdir / "upstream.error.log"), "-p", str(workdir), "-c", str(conf)]
    check = subprocess.run([*argv[:1], "-t", "-q", *argv[1:]], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        sys.exit(f"nginx -t failed for {conf}:\n{check.stdout}{check.stderr}")
    children.start("upstream", argv, cpus=cpus)
    wait_http(port, "/")


def create_population(admin_port, count, connections):
    """Creates scenario (c)'s keys through the admin API; returns the raw keys.

    The contract has no bulk call, so this is one POST /v1/keys per key, on a few
    keep-alive connections in parallel (the store serialises the writes, but the
    HTTP and JSON work of the two sides overlaps)."""
    keys = [None] * count
    failures = []

    def worker(first):
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
        try:
            for i in range(first, count, connections):
                if failures:
                    return
                keys[i] = admin(conn, "POST", "/v1/keys", {"name": f"load-{i:05d}", **LOAD_KEY_FIELDS})["key"]
        except (SystemExit, OSError, ValueError) as e:
            failures.append(f"creating key {i}: {e}")
        finally:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(min(connections, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit(failures[0])
    took = time.monotonic() - started
    print(f"created {count:,} keys through the admin API in {took:.1f} s ({count / took:,.0f}/s, "
          f"{min(connections, count)} connections)", flush=True)
    return keys


def wait_population(gateway_port, keys):
    """Waits until the gateway accepts every one of the keys (each is retried until it has
    reached the gateway through the feed) and checks that the plan's rate limit applies,
    before any load starts: a key the gateway refused would void the load's figures."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)
    started = time.monotonic()
    for key in keys:
        while (status := status_of(conn, key)) != 200:
            if time.monotonic() - started > WAIT_LIMIT_S:
                sys.exit(f"the gateway still answers {status} to key {keys.index(key)} after {WAIT_LIMIT_S} s")
            time.sleep(0.01)
    limit = get(conn, keys[0]).getheader("ratelimit-limit")
    conn.close()
    if limit != str(NEVER_REACHED_RATE):
        sys.exit(f"expected RateLimit-Limit {NEVER_REACHED_RATE} (plan bench), got {limit!r}")
    print(f"the gateway accepts all {len(keys):,} keys (RateLimit-Limit {limit}); checked in "
          f"{time.monotonic() - started:.1f} s", flush=True)


def stop_wrk(popen, log):
    """SIGINT makes wrk stop early and still print its summary (and rotate_keys.lua's
    WRKJSON line), which is parsed here."""
    if popen.poll() is not None:
        sys.exit(f"wrk stopped before the end of the measurement ({popen.returncode}):\n{log.read_text()[-2000:]}")
    popen.send_signal(signal.SIGINT)
    try:
        popen.wait(timeout=15)
    except subprocess.TimeoutExpired:
        sys.exit("wrk did not stop on SIGINT")
    out = log.read_text()
    line = next((l for l in out.splitlines() if l.startswith("WRKJSON ")), None)
    if line is None:
        sys.exit(f"no WRKJSON line in wrk's output:\n{out[-2000:]}")
    return json.loads(line[len("WRKJSON "):])


# --------------------------------------------------------------------------- measurement


def measure(rounds, admin_port, gateway_port, key_fields, polls, poll_ms=None):
    """The rounds: create, wait until accepted, revoke, time to the first 401.
    `polls` counts the statuses of every request sent to the gateway, so that they
    can be told apart from the load in the gateway's counters; `poll_ms` (a list)
    gets each poll's round trip: under load, a poll waits its turn behind wrk's
    connections, and the latency measured includes up to one such round trip."""
    admin_conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    gateway_conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)

    def poll_until(key, want, what):
        deadline = time.monotonic() + WAIT_LIMIT_S
        while True:
            sent = time.perf_counter()
            status = status_of(gateway_conn, key)
            if poll_ms is not None:
                poll_ms.append((time.perf_counter() - sent) * 1000)
            polls[status] += 1
            if status == want:
                return
            if time.monotonic() > deadline:
                sys.exit(f"the gateway did not {what} within {WAIT_LIMIT_S} s (last status {status})")

    latencies = []
    for _ in range(rounds):
        created = admin(admin_conn, "POST", "/v1/keys", {"name": "latency", **key_fields})
        key, key_id = created["key"], created["record"]["id"]
        poll_until(key, 200, "accept a new key")
        admin(admin_conn, "POST", f"/v1/keys/{key_id}/revoke", {})
        answered = time.perf_counter()
        poll_until(key, 401, "refuse a revoked key")
        latencies.append((time.perf_counter() - answered) * 1000)
    return latencies


def measure_under_load(args, children, tools, ports, serving, metrics_port):
    """The rounds while wrk drives scenario (c)'s load through the gateway; returns the
    latencies and a report of the load (the gateway's req/s during the rounds, wrk's
    totals, the gateway's CPU)."""
    keys = create_population(ports["admin"], args.keys, args.create_connections)
    wait_population(ports["gateway"], keys)
    keys_file = children.workdir / "keys.txt"
    keys_file.write_text("\n".join(keys) + "\n")

    # wrk runs for the whole measurement; its -d is only a bound: SIGINT ends it.
    load_started = (process_ticks(serving.pid), time.monotonic())
    wrk = children.start("wrk", [tools["wrk"], "-t", str(args.wrk_threads), "-c", str(args.connections),
                                 "-d", "3600s", "--timeout", "5s", "-s", str(HERE / "rotate_keys.lua"),
                                 f"http://127.0.0.1:{ports['gateway']}/v1/orders/1", "--", str(keys_file)],
                         cpus=args.load_cpus)
    print(f"load: wrk -t{args.wrk_threads} -c{args.connections} rotating {args.keys:,} keys and the nginx "
          f"upstream on CPU {args.load_cpus}, keygate ({args.mode}) on CPU {args.proxy_cpus}"
          + (f", control plane on CPU {args.control_plane_cpus or 'any (not pinned)'}"
             if args.mode == "gateway" else "")
          + f"; {args.warmup:g} s warm-up", flush=True)
    time.sleep(args.warmup)
    children.check_alive()

    polls, poll_ms = collections.Counter(), []
    before = (route_outcomes(metrics_port), time.monotonic())
    latencies = measure(args.rounds, ports["admin"], ports["gateway"], LOAD_KEY_FIELDS, polls, poll_ms)
    after = (route_outcomes(metrics_port), time.monotonic())
    children.check_alive()
    w = stop_wrk(wrk, children.workdir / "wrk.log")
    load_ended = (process_ticks(serving.pid), time.monotonic())

    # The gateway's counters over the rounds, less this script's own polls (the test
    # keys are not in wrk's rotation: their 401s are the polls', not the load's).
    seconds = after[1] - before[1]
    counted = after[0] - before[0]  # Counter subtraction: the outcomes that grew
    load_allowed = counted["allowed"] - polls[200]
    load_denied = sum(n for outcome, n in counted.items() if outcome != "allowed") - \
        sum(n for status, n in polls.items() if status != 200)
    # CPU time has a resolution of 1/CLK_TCK (10 ms): taken over the whole load run
    # (warm-up included), which is long enough, rather than over the rounds alone.
    busy = (load_ended[0] - load_started[0]) / CLK_TCK / (load_ended[1] - load_started[1])
    wrk_rps = w["requests"] / (w["duration_us"] / 1e6)
    socket_errors = w["errors_connect"] + w["errors_read"] + w["errors_write"] + w["errors_timeout"]
    if w["errors_status"] or socket_errors or load_denied > 2:
        print("warning: the load was not all 2xx: the gateway refused or dropped some of the rotated keys",
              file=sys.stderr)
    report = (f"load during the rounds: {load_allowed / seconds:,.0f} req/s allowed over {seconds:.1f} s, "
              f"{max(0, load_denied)} denied\n"
              f"wrk over its whole run (warm-up included): {w['requests']:,} requests, {wrk_rps:,.0f} req/s, "
              f"p50 {w['lat_p50_us'] / 1000:.3f} ms, p99 {w['lat_p99_us'] / 1000:.3f} ms, "
              f"non-2xx {w['errors_status']}, socket errors {socket_errors}; "
              f"keygate ({args.mode}) {busy * 100:.0f}% of a core busy\n"
              f"this script's polls of the gateway: {sum(polls.values()):,} {dict(sorted(polls.items()))}, "
              f"round trip p50 {statistics.median(poll_ms):.2f} ms")
    return latencies, report


def write_configs(args, workdir, ports):
    """[(file name, text, port answering /healthz when it is up, taskset CPUs or None)]."""
    if args.load:
        # Scenario (c) of compare.py (keygate.yaml.tmpl): key, allowlist, scope, a rate
        # limit never reached, usage counted to a file flushed hourly, no access log.
        common = f"""
client_ip: {{ trusted_proxies: [] }}
key_locations: [ {{ header: x-api-key }} ]
upstreams:
  api: {{ targets: ["127.0.0.1:{ports['upstream']}"], connect_timeout: 2s, read_timeout: 30s }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api, scopes: [orders:read] }}
plans:
  bench: {{ rate_limit: {{ requests: {NEVER_REACHED_RATE}, per: 1s }} }}
default_plan: bench
usage:
  flush_interval: 1h
  sinks: [ {{ type: file, path: "{workdir}/usage.jsonl" }} ]
access_log: off
shutdown_timeout: 1s
"""
        proxy_cpus, cp_cpus = args.proxy_cpus, args.control_plane_cpus or None
    else:
        common = f"""
upstreams:
  api: {{ targets: ["127.0.0.1:{ports['upstream']}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api }}
access_log: off
"""
        proxy_cpus = cp_cpus = None
    tokens = """  tokens: [ { name: bench, token: "${env:ADMIN_TOKEN}" } ]
  sync_tokens: [ { name: edge, token: "${env:SYNC_TOKEN}" } ]
"""
    if args.mode == "gateway":
        cp = (f"mode: control-plane\nnode_id: cp\nadmin:\n  address: 127.0.0.1:{ports['admin']}\n{tokens}"
              f"store: {{ url: \"sqlite://{workdir}/cp.db\" }}\n")
        gw = f"""mode: gateway
node_id: gw
threads: 1
listeners: [ {{ address: 127.0.0.1:{ports['gateway']} }} ]
admin: {{ address: 127.0.0.1:{ports['gateway_admin']} }}
keys:
  source: control_plane
  control_plane: {{ url: "http://127.0.0.1:{ports['admin']}", token: "${{env:SYNC_TOKEN}}" }}
{common}"""
        return [("cp.yaml", cp, ports["admin"], cp_cpus), ("gw.yaml", gw, ports["gateway_admin"], proxy_cpus)]
    sa = f"""mode: standalone
node_id: sa
threads: 1
listeners: [ {{ address: 127.0.0.1:{ports['gateway']} }} ]
admin:
  address: 127.0.0.1:{ports['admin']}
{tokens}store: {{ url: "sqlite://{workdir}/sa.db" }}
{common}"""
    return [("sa.yaml", sa, ports["admin"], proxy_cpus)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keygate", default="target/release/keygate")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--mode", choices=["gateway", "standalone"], default="gateway")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, logs) afterwards")
    load = parser.add_argument_group("under load (--load)")
    load.add_argument("--load", action="store_true", help="measure while the gateway serves the load of scenario (c)")
    load.add_argument("--keys", type=int, default=10_000, help="keys created and rotated by wrk (default 10000)")
    load.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    load.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    load.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the gateway (default 0)")
    load.add_argument("--load-cpus", default="1", help="taskset CPU list for wrk and the upstream (default 1)")
    load.add_argument("--control-plane-cpus", default="",
                      help="taskset CPU list for the control plane (default: not pinned)")
    load.add_argument("--warmup", type=float, default=2, help="seconds of load before the first round (default 2)")
    load.add_argument("--create-connections", type=int, default=4,
                      help="parallel admin API connections creating the keys (default 4)")
    args = parser.parse_args()
    if args.rounds < 1 or args.keys < 1:
        sys.exit("--rounds and --keys must be at least 1")
    if not os.path.exists(args.keygate):
        sys.exit(f"{args.keygate} does not exist: build it with `cargo build --release --bin keygate`")
    args.keygate = os.path.abspath(args.keygate)  # the processes run in the work directory
    tools = {}
    if args.load:
        for tool in ("nginx", "wrk", "taskset"):
            tools[tool] = find_tool(tool)
        missing = [t for t, path in tools.items() if path is None]
        if missing:
            sys.exit(f"--load needs {', '.join(missing)}, not installed here: "
                     f"`apt-get install -y wrk nginx util-linux` (load-tests/run.sh installs them)")

    # SIGTERM and SIGHUP end the script like Ctrl-C does: through the cleanup below.
    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    workdir = Path(tempfile.mkdtemp(prefix="keygate-revocation-"))
    children = Children(workdir)
    server = None
    keep = args.keep_workdir
    try:
        ports = {name: free_port() for name in ("upstream", "admin", "gateway", "gateway_admin")}
        if args.load:
            start_upstream_nginx(children, tools["nginx"], workdir, ports["upstream"], args.load_cpus)
        else:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", ports["upstream"]), Upstream)
            threading.Thread(target=server.serve_forever, daemon=True).start()

        env = dict(os.environ, ADMIN_TOKEN=ADMIN_TOKEN, SYNC_TOKEN=SYNC_TOKEN, KEYGATE_LOG="warn")
        serving = None  # the process that serves the gateway's traffic
        for name, text, port, cpus in write_configs(args, workdir, ports):
            path = workdir / name
            path.write_text(text)
            serving = children.start(name.removesuffix(".yaml"), [args.keygate, "serve", "-c", str(path)], env, cpus)
            wait_http(port)
        metrics_port = ports["admin"] if args.mode == "standalone" else ports["gateway_admin"]
        wait_http(metrics_port, "/readyz")

        if args.load:
            latencies, load_report = measure_under_load(args, children, tools, ports, serving, metrics_port)
        else:
            latencies = measure(args.rounds, ports["admin"], ports["gateway"], {}, collections.Counter())
    except BaseException as e:
        # Keep the configs and logs of a failed run (not of an interrupted one).
        if not isinstance(e, KeyboardInterrupt) and not (isinstance(e, SystemExit) and
                                                         str(e.code).startswith("stopped by signal")):
            keep = True
        raise
    finally:
        children.stop_all()
        if server is not None:
            server.shutdown()
        if keep:
            print(f"work directory (configs, logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"mode={args.mode}{' load' if args.load else ''} rounds={len(latencies)} "
          f"p50={statistics.median(latencies):.2f}ms p99={p99:.2f}ms max={latencies[-1]:.2f}ms")
    if args.load:
        print(load_report)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # everything started was stopped on the way out
        sys.exit("interrupted")
