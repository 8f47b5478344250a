#!/usr/bin/env python3
"""Usage ingestion by a control plane, in records per second (issue #13, point 1).

    load-tests/usage_ingest.py --records 1000000 --store both
    load-tests/usage_ingest.py --records 20000 --keygate target/debug/keygate   # a quick check

A control plane (`mode: control-plane`) on a fresh PostgreSQL database and on a fresh
SQLite file, one after the other (--store). The script makes N usage records as
gateways send them: windows of K active keys (--keys, default every record a key of
its own), cut into uploads of at most the chunk size that gateways use
(`MAX_UPLOAD_RECORDS`, read from src/control/upload.rs), each with its own sequence.
The JSON bodies are built before the clock starts. Then U uploaders (--uploaders),
each on its own keep-alive connection, post them to `POST /v1/sync/usage` as fast as
they are answered. Measured: records per second from the first upload to the last
answer, upload latency (median, p99), the control plane's peak resident memory
(VmHWM, reset just before the first upload) and CPU time. Checked: every upload is
answered 200 and counted (`duplicate: false`), the store holds exactly the requests
sent, and a repeated upload is answered `duplicate: true` and not counted again.

Prints a table and writes it as markdown (--out). Every process started is stopped on
exit, failure or Ctrl-C; the work directory and the database are removed unless
--keep-workdir. Python 3.9+ standard library; for PostgreSQL a reachable server and `psql`.
"""

import argparse
import datetime
import http.client
import json
import os
import queue
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ADMIN_TOKEN = "ingest-admin-token"
SYNC_TOKEN = "ingest-sync-token"
WINDOW_SECONDS = 5


def chunk_size_from_source():
    """`MAX_UPLOAD_RECORDS` as the control plane enforces it."""
    text = (REPO / "src/control/upload.rs").read_text()
    found = re.search(r"pub const MAX_UPLOAD_RECORDS: usize = ([0-9_]+);", text)
    if not found:
        sys.exit("cannot find MAX_UPLOAD_RECORDS in src/control/upload.rs")
    return int(found.group(1).replace("_", ""))


def psql(url, sql):
    try:
        result = subprocess.run(["psql", url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                                capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        sys.exit("--store postgres needs `psql` (apt-get install postgresql-client)")
    if result.returncode != 0:
        sys.exit(f"psql {sql!r} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def with_database(url, name):
    """`url` with its database replaced by `name` (no ?query expected)."""
    scheme, rest = url.split("://", 1)
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}"


def rfc3339(epoch_seconds):
    return datetime.datetime.fromtimestamp(epoch_seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_uploads(records, keys, chunk):
    """JSON bodies of `records` usage records: windows of `keys` keys, ending 5 s apart up to
    now, in uploads of at most `chunk` records. Each record is 1 request, allowed, 2xx.
    Returns (bodies, records in each body)."""
    windows = -(-records // keys)
    now = int(time.time())
    bodies, counts = [], []
    sequence = 0
    made = 0
    for w in range(windows):
        end = now - (windows - 1 - w) * WINDOW_SECONDS
        start_text, end_text = rfc3339(end - WINDOW_SECONDS), rfc3339(end)
        in_window = min(keys, records - made)
        for first in range(0, in_window, chunk):
            lines = [
                f'{{"node":"gw-load","key_id":"key_{i:026d}","window_start":"{start_text}",'
                f'"window_end":"{end_text}","requests":1,"allowed":1,"denied":{{}},'
                f'"status":{{"2xx":1,"3xx":0,"4xx":0,"5xx":0}},"bytes_in":120,"bytes_out":900,'
                f'"last_used_at":"{end_text}"}}'
                for i in range(first, min(first + chunk, in_window))
            ]
            sequence += 1
            body = f'{{"node":"gw-load","boot_id":"load-boot","sequence":{sequence},"records":[{",".join(lines)}]}}'
            bodies.append(body.encode())
            counts.append(len(lines))
        made += in_window
    return bodies, counts


class Uploader(threading.Thread):
    """Posts bodies from a shared queue on one keep-alive connection."""

    def __init__(self, port, work, failures):
        super().__init__(daemon=True)
        self.port, self.work, self.failures = port, work, failures
        self.latencies = []

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        headers = {"Authorization": f"Bearer {SYNC_TOKEN}", "Content-Type": "application/json"}
        while True:
            try:
                body = self.work.get_nowait()
            except queue.Empty:
                break
            started = time.perf_counter()
            try:
                conn.request("POST", "/v1/sync/usage", body, headers)
                response = conn.getresponse()
                text = response.read()
            except OSError as e:
                self.failures.append(f"upload failed: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
                continue
            self.latencies.append(time.perf_counter() - started)
            if response.status != 200 or json.loads(text).get("duplicate") is not False:
                self.failures.append(f"HTTP {response.status}: {text[:300]!r}")
        conn.close()


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/sync/usage", body,
                     {"Authorization": f"Bearer {SYNC_TOKEN}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


class Run:
    """One control plane on one store, measured."""

    def __init__(self, args, store, workdir, bodies, counts):
        self.args, self.store, self.workdir = args, store, workdir / store
        self.workdir.mkdir()
        self.bodies, self.counts = bodies, counts
        self.children = harness.Children(self.workdir)
        self.port = harness.free_port()
        self.database = None

    def store_url(self):
        if self.store == "postgres":
            return with_database(self.args.pg_url, self.database)
        return f"sqlite://{self.workdir}/keygate.db"

    def stored_requests(self):
        sql = "SELECT COALESCE(SUM(requests), 0) FROM usage_buckets"
        if self.store == "postgres":
            return int(psql(self.store_url(), sql))
        db = sqlite3.connect(self.workdir / "keygate.db")
        try:
            return int(db.execute(sql).fetchone()[0])
        finally:
            db.close()

    def measure(self):
        if self.store == "postgres":
            self.database = f"keygate_ingest_{os.getpid()}"
            psql(self.args.pg_url, f"DROP DATABASE IF EXISTS {self.database}")
            psql(self.args.pg_url, f"CREATE DATABASE {self.database}")
        config = self.workdir / "control-plane.yaml"
        config.write_text(f"""mode: control-plane
node_id: cp-ingest
admin:
  address: 127.0.0.1:{self.port}
  tokens: [ {{ name: load, token: "${{env:ADMIN_TOKEN}}" }} ]
  sync_tokens: [ {{ name: edge, token: "${{env:SYNC_TOKEN}}" }} ]
store: {{ url: "{self.store_url()}" }}
""")
        env = dict(os.environ, ADMIN_TOKEN=ADMIN_TOKEN, SYNC_TOKEN=SYNC_TOKEN,
                   KEYGATE_LOG=os.environ.get("KEYGATE_LOG", "warn"))
        cp = self.children.start("control-plane", [self.args.keygate, "serve", "-c", str(config)], env)
        harness.wait_http(self.port, "/healthz", timeout=120, alive=self.children.check_alive)
        time.sleep(1)  # past the start's own allocations
        harness.reset_peak_rss(cp.pid)
        sampler = harness.RssSampler(cp.pid)
        ticks_before = harness.process_ticks(cp.pid)

        work = queue.Queue()
        for body in self.bodies:
            work.put(body)
        failures = []
        uploaders = [Uploader(self.port, work, failures) for _ in range(self.args.uploaders)]
        started = time.perf_counter()
        for u in uploaders:
            u.start()
        for u in uploaders:
            u.join()
        elapsed = time.perf_counter() - started

        cpu_s = (harness.process_ticks(cp.pid) - ticks_before) / harness.CLK_TCK
        peak = max(harness.peak_rss_bytes(cp.pid) or 0, sampler.stop())
        self.children.check_alive()
        if failures:
            sys.exit(f"{self.store}: {len(failures)} upload(s) failed, the first: {failures[0]}")
        records = sum(self.counts)
        stored = self.stored_requests()
        if stored != records:
            sys.exit(f"{self.store}: the store holds {stored} requests, {records} were sent")
        status, answer = post(self.port, self.bodies[0])
        if status != 200 or answer.get("duplicate") is not True or self.stored_requests() != records:
            sys.exit(f"{self.store}: a repeated upload was counted again ({status} {answer})")
        latencies = [t for u in uploaders for t in u.latencies]
        return {
            "store": self.store,
            "records": records,
            "uploads": len(self.bodies),
            "seconds": elapsed,
            "per_second": records / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": harness.quantile(latencies, 0.99) * 1000,
            "peak_rss": peak,
            "cpu_s": cpu_s,
        }

    def cleanup(self):
        self.children.stop_all(timeout=30)
        if self.database is not None and not self.args.keep_workdir:
            try:
                psql(self.args.pg_url, f"DROP DATABASE IF EXISTS {self.database}")
            except SystemExit as e:
                print(f"warning: could not drop the database {self.database}: {e}", file=sys.stderr)


def report(args, results, chunk, body_bytes, started_at):
    command = "load-tests/usage_ingest.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Usage ingestion: {args.records:,} records, windows of {args.keys:,} keys",
        "",
        f"`{command}` on {started_at:%Y-%m-%d}; {harness.machine()}; {harness.describe_keygate(args.keygate, REPO)}. "
        f"Uploads of at most {chunk:,} records ({harness.mb(body_bytes)} "
        f"of JSON per full upload), {args.uploaders} uploaders on keep-alive connections.",
        "",
        "| store | records | uploads | time | records/s | upload p50 | upload p99 | control plane peak RSS "
        "| control plane CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['store']} | {r['records']:,} | {r['uploads']:,} | {r['seconds']:.2f} s | {r['per_second']:,.0f} "
            f"| {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {harness.mb(r['peak_rss'])} | {r['cpu_s']:.1f} s |")
    lines += [
        "",
        "- This is what one control plane takes in from several gateways at once; one gateway sends its "
        "batches one after the other (`load-tests/usage_window.py` measures a gateway's window).",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="N, usage records sent (default 1000000)")
    parser.add_argument("--keys", type=int, default=0,
                        help="K, active keys per window (default N: every record a key of its own)")
    parser.add_argument("--uploaders", type=int, default=4, help="U, concurrent uploaders (default 4)")
    parser.add_argument("--store", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--keygate", default=str(REPO / "target/release/keygate"))
    parser.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server where the script may create and drop a database")
    parser.add_argument("--out", help="markdown table (default load-tests/results/usage-ingest-N.md)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the work directory (configs, logs, the SQLite file) and the database")
    args = parser.parse_args()
    args.keys = args.keys or args.records
    if args.records < 1 or args.keys < 1 or args.uploaders < 1:
        sys.exit("--records, --keys and --uploaders must be at least 1")
    if not os.path.exists(args.keygate):
        sys.exit(f"{args.keygate} does not exist: build it with `cargo build --release --bin keygate`")
    args.keygate = os.path.abspath(args.keygate)
    out = Path(args.out or HERE / "results" / f"usage-ingest-{args.records}.md")
    harness.exit_on_signals()

    chunk = chunk_size_from_source()
    print(f"building {args.records:,} records in uploads of at most {chunk:,}...", flush=True)
    bodies, counts = make_uploads(args.records, args.keys, chunk)
    full = max(range(len(bodies)), key=lambda i: counts[i])
    started_at = datetime.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="keygate-ingest-"))
    stores = ["postgres", "sqlite"] if args.store == "both" else [args.store]
    results = []
    failed = False
    try:
        for store in stores:
            run = Run(args, store, workdir, bodies, counts)
            try:
                result = run.measure()
            finally:
                run.cleanup()
            results.append(result)
            print(f"{store}: {result['records']:,} records in {result['seconds']:.2f} s = "
                  f"{result['per_second']:,.0f} records/s; peak RSS {harness.mb(result['peak_rss'])}", flush=True)
    except BaseException as e:
        failed = not harness.stopped_by_user(e)
        raise
    finally:
        if args.keep_workdir or failed:
            print(f"work directory (configs, logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    text = report(args, results, chunk, len(bodies[full]), started_at)
    harness.publish(text, out)


if __name__ == "__main__":
    main()
