#!/usr/bin/env python3
"""One usage window with N active keys, from a gateway to the store (issue #13).

    load-tests/usage_window.py --keys 1000000 --store postgres
    load-tests/usage_window.py --keys 1000000 --store sqlite
    load-tests/usage_window.py --keys 20000 --keygate target/debug/keygate      # a quick check

One machine, loopback: a control plane on a fresh PostgreSQL database (or a SQLite
file), N keys imported with `keygate keys import` (raw keys kept by the script), and a
gateway following it with `usage.spool` and `{type: control_plane}` and a long
`usage.flush_interval` (--window). wrk sends requests through the gateway, each
connection walking the keys in turn, until every key has been used; then the window
closes and the gateway uploads one record per key, in batches of at most 5,000.

Measured: the time from the window's end until the store holds every key's usage
(polled with SQL on `usage_buckets`), hence records per second ingested and the
largest window this setup delivers within one flush interval; the gateway's and the
control plane's peak resident memory; `keygate_usage_dropped_total` (must stay 0).

Needs wrk (load-tests/run.sh installs it), Python 3.9+, and for --store postgres a
reachable server and `psql`. Prints a table and writes it as markdown (--out).
"""

import argparse
import datetime
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import mb
from scale import make_key, metric, psql, with_database

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ADMIN_TOKEN = "usage-window-admin-token"
SYNC_TOKEN = "usage-window-sync-token"

WRK_SCRIPT = """
-- Thread t of T sends keys t, t + T, t + 2T, ...: together they use every key in turn.
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE")) do keys[#keys + 1] = line end
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("offset", counter)
end
function init(args)
  n = 0
end
function request()
  local key = keys[(n * THREADS + offset - 1) % #keys + 1]
  n = n + 1
  return wrk.format("GET", "/v1/orders/1", { ["x-api-key"] = key })
end
"""

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="N, keys active in the window (default 100000)")
    parser.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--keygate", default=str(REPO / "target/release/keygate"))
    parser.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rate", type=float, default=8000,
                        help="requests/s wrk is assumed to reach: it runs N / rate + 5 s and the window is "
                             "20 s longer (default 8000)")
    parser.add_argument("--out", help="markdown (default load-tests/results/usage-window-N-STORE.md)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the upload (default 1800)")
    args = parser.parse_args()
    if not os.path.exists(args.keygate):
        sys.exit(f"{args.keygate} does not exist: build it with `cargo build --release --bin keygate`")
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk (load-tests/run.sh installs it)")
    args.keygate = os.path.abspath(args.keygate)
    duration = args.keys / args.rate + 5
    window = duration + 20
    harness.exit_on_signals()

    workdir = Path(tempfile.mkdtemp(prefix="keygate-usage-window-"))
    children = harness.Children(workdir)
    env = dict(os.environ, ADMIN_TOKEN=ADMIN_TOKEN, SYNC_TOKEN=SYNC_TOKEN, KEYGATE_LOG="warn", TMPDIR=str(workdir))
    ports = {name: harness.free_port() for name in ("upstream", "admin", "gw_proxy", "gw_admin")}
    upstream = harness.start_upstream(ports["upstream"])
    database = None
    rows = []
    try:
        if args.store == "postgres":
            database = f"keygate_usage_window_{os.getpid()}"
            psql(args.pg_url, f"CREATE DATABASE {database}")
            store_url = with_database(args.pg_url, database)
        else:
            store_url = f"sqlite://{workdir}/store.db"
        (workdir / "control-plane.yaml").write_text(f"""mode: control-plane
node_id: cp
admin:
  address: 127.0.0.1:{ports['admin']}
  tokens: [ {{ name: ops, token: "${{env:ADMIN_TOKEN}}" }} ]
  sync_tokens: [ {{ name: edge, token: "${{env:SYNC_TOKEN}}" }} ]
store: {{ url: "{store_url}" }}
""")
        cp = children.start("control-plane", [args.keygate, "serve", "-c", str(workdir / "control-plane.yaml")], env)
        harness.wait_http(ports["admin"], "/healthz", timeout=300, alive=children.check_alive)

        # ---- the keys: raw ones for wrk, their hashes for the import ----
        import random
        rng = random.Random("usage-window")
        keys_file, ndjson = workdir / "keys.txt", workdir / "keys.ndjson"
        with open(keys_file, "w") as raw_out, open(ndjson, "w") as records:
            for i in range(args.keys):
                raw = make_key(rng)
                raw_out.write(raw + "\n")
                digest = hashlib.sha256(raw.encode()).hexdigest()
                records.write(f'{{"hash":"sha256:{digest}","name":"window {i}","owner":"org-{i % 1000:04d}"}}\n')
        started = time.monotonic()
        result = subprocess.run([args.keygate, "keys", "--admin-url", f"http://127.0.0.1:{ports['admin']}",
                                 "--token", ADMIN_TOKEN, "--json", "import", str(ndjson)],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(f"import failed: {result.stdout[-1000:]}{result.stderr[-1000:]}")
        print(f"import: {args.keys:,} keys in {time.monotonic() - started:.1f} s", flush=True)

        (workdir / "gateway.yaml").write_text(f"""mode: gateway
node_id: gw
threads: 1
listeners: [ {{ address: 127.0.0.1:{ports['gw_proxy']} }} ]
admin: {{ address: 127.0.0.1:{ports['gw_admin']} }}
keys:
  source: control_plane
  control_plane: {{ url: "http://127.0.0.1:{ports['admin']}", token: "${{env:SYNC_TOKEN}}" }}
upstreams:
  api: {{ targets: ["127.0.0.1:{ports['upstream']}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api }}
usage:
  flush_interval: {window:.0f}s
  spool: {workdir}/usage.spool
  sinks: [ {{ type: control_plane }} ]
access_log: off
""")
        gw = children.start("gateway", [args.keygate, "serve", "-c", str(workdir / "gateway.yaml")], env)
        harness.wait_http(ports["gw_admin"], "/readyz", timeout=600, alive=children.check_alive)
        # The first window starts about when the gateway is ready.
        window_started = time.monotonic()

        # ---- every key used once or more, inside the window ----
        threads, connections = 2, 32
        script = workdir / "walk.lua"
        script.write_text(WRK_SCRIPT.replace("THREADS", str(threads)))
        wrk_env = dict(os.environ, KEYS_FILE=str(keys_file))
        wrk = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:.0f}s",
                              "--latency", "-s", str(script), f"http://127.0.0.1:{ports['gw_proxy']}/"],
                             capture_output=True, text=True, env=wrk_env)
        found = re.search(r"(\d+) requests in", wrk.stdout)
        sent = int(found.group(1)) if found else 0
        print(f"wrk: {sent:,} requests in {duration:.0f} s", flush=True)
        if sent < args.keys:
            print(f"warning: {sent:,} requests for {args.keys:,} keys: not every key is active (a lower --rate "
                  "gives wrk longer)", file=sys.stderr)
        expected_keys = min(sent, args.keys)

        # ---- the window closes; the upload ----
        harness.reset_peak_rss(cp.pid)
        window_end = window_started + window
        while time.monotonic() < window_end:
            time.sleep(0.2)

        def counted():
            sql = "SELECT COUNT(DISTINCT key_id), COALESCE(SUM(requests), 0) FROM usage_buckets"
            if args.store == "postgres":
                keys, requests = psql(store_url, sql).strip().split("|")
                return int(keys), int(requests)
            with sqlite3.connect(f"file:{workdir}/store.db?mode=ro", uri=True) as db:
                keys, requests = db.execute(sql).fetchone()
                return int(keys), int(requests)

        active = None
        deadline = time.monotonic() + args.timeout
        while True:
            have = counted()
            pending = metric(ports["gw_admin"], "keygate_usage_pending")
            if have[0] >= expected_keys and pending == 0:
                active = have
                break
            if time.monotonic() > deadline:
                sys.exit(f"the window was not delivered within {args.timeout} s: {have} so far")
            children.check_alive()
            time.sleep(0.2)
        took = time.monotonic() - window_end
        gw_peak, cp_peak = harness.peak_rss_bytes(gw.pid), harness.peak_rss_bytes(cp.pid)
        dropped = metric(ports["gw_admin"], "keygate_usage_dropped_total")
        rate = active[0] / took
        print(f"window: {active[0]:,} keys, {active[1]:,} requests stored {took:.1f} s after the window's end "
              f"({rate:,.0f} records/s); gateway peak {mb(gw_peak)}, control plane peak {mb(cp_peak)}", flush=True)
        rows = [
            ("keys active in the window (records uploaded)", f"{active[0]:,}"),
            ("requests wrk saw answered / counted in the store (wrk stops with requests in flight)",
             f"{sent:,} / {active[1]:,}"),
            ("window's end to every record stored (polled every 0.2 s)", f"{took:.1f} s"),
            ("records ingested per second", f"{rate:,.0f}"),
            ("largest window delivered within a 5 s flush interval, at that rate", f"{rate * 5:,.0f} active keys"),
            ("gateway peak resident memory (VmHWM)", mb(gw_peak)),
            ("control plane peak resident memory during the upload (VmHWM)", mb(cp_peak)),
            ("`keygate_usage_dropped_total`", f"{dropped:g}" if dropped is not None else "absent"),
        ]
        if active[1] < sent:
            rows.append(("**counted < answered**", f"{active[1] - sent:+,}"))
    finally:
        children.stop_all(timeout=60)
        upstream.shutdown()
        if database is not None:
            try:
                psql(args.pg_url, f"DROP DATABASE IF EXISTS {database}")
            except SystemExit as e:
                print(f"warning: could not drop {database}: {e}", file=sys.stderr)

    lines = [f"# One usage window with {args.keys:,} active keys: {args.store}", "",
             f"`load-tests/usage_window.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}; "
             f"{harness.machine()}; {harness.describe_keygate(args.keygate, REPO)}; flush interval {window:.0f} s.", "",
             "| what | measured |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    text = "\n".join(lines) + "\n"
    harness.publish(text, Path(args.out or HERE / "results" / f"usage-window-{args.keys}-{args.store}.md"))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
