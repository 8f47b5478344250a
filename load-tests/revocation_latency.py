#!/usr/bin/env python3
"""Revocation latency: from the admin API's answer to the first 401 at a gateway.

Starts a control plane (SQLite in a temporary directory), a gateway following it
and a small upstream, all on loopback; then, for each round, creates a key,
waits until the gateway accepts it, revokes it and measures how long after the
revoke call returned the gateway's first 401 comes. Prints p50/p99/max.

    load-tests/revocation_latency.py [--keygate target/release/keygate] [--rounds 200]

With --mode standalone the same is measured for one standalone process
(in-process feed). Only the Python standard library is needed.
"""

import argparse
import http.client
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ADMIN_TOKEN = "latency-admin-token"
SYNC_TOKEN = "latency-sync-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Header and body in separate small writes would wait on a delayed ACK
    # (~40 ms) and make every poll that slow.
    disable_nagle_algorithm = True

    def do_GET(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def log_message(self, *args):
        pass


def wait_http(port, path="/healthz", timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"nothing answered on port {port} within {timeout}s")


def admin(conn, method, path, body=None):
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status >= 300:
        sys.exit(f"admin API {method} {path}: {response.status} {data!r}")
    return json.loads(data) if data else None


def status_of(conn, key):
    conn.request("GET", "/v1/orders/1", headers={"x-api-key": key})
    response = conn.getresponse()
    response.read()
    return response.status


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keygate", default="target/release/keygate")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--mode", choices=["gateway", "standalone"], default="gateway")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="keygate-revocation-")
    upstream_port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    env = dict(os.environ, ADMIN_TOKEN=ADMIN_TOKEN, SYNC_TOKEN=SYNC_TOKEN, KEYGATE_LOG="warn")
    admin_port, gateway_port, gateway_admin = free_port(), free_port(), free_port()
    common = f"""
upstreams:
  api: {{ targets: ["127.0.0.1:{upstream_port}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api }}
access_log: off
"""
    tokens = """  tokens: [ { name: bench, token: "${env:ADMIN_TOKEN}" } ]
  sync_tokens: [ { name: edge, token: "${env:SYNC_TOKEN}" } ]
"""
    processes = []
    if args.mode == "gateway":
        cp = f"mode: control-plane\nnode_id: cp\nadmin:\n  address: 127.0.0.1:{admin_port}\n{tokens}store: {{ url: \"sqlite://{workdir}/cp.db\" }}\n"
        gw = f"""mode: gateway
node_id: gw
threads: 1
listeners: [ {{ address: 127.0.0.1:{gateway_port} }} ]
admin: {{ address: 127.0.0.1:{gateway_admin} }}
keys:
  source: control_plane
  control_plane: {{ url: "http://127.0.0.1:{admin_port}", token: "${{env:SYNC_TOKEN}}" }}
{common}"""
        configs = [("cp.yaml", cp, admin_port), ("gw.yaml", gw, gateway_admin)]
    else:
        sa = f"""mode: standalone
node_id: sa
threads: 1
listeners: [ {{ address: 127.0.0.1:{gateway_port} }} ]
admin:
  address: 127.0.0.1:{admin_port}
{tokens}store: {{ url: "sqlite://{workdir}/sa.db" }}
{common}"""
        configs = [("sa.yaml", sa, admin_port)]
    for name, text, port in configs:
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            f.write(text)
        log = open(os.path.join(workdir, name + ".log"), "w")
        processes.append(subprocess.Popen([args.keygate, "serve", "-c", path], env=env, stdout=log, stderr=log))
        wait_http(port)
    wait_http(admin_port if args.mode == "standalone" else gateway_admin, "/readyz")

    admin_conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    gateway_conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)
    latencies = []
    try:
        for _ in range(args.rounds):
            created = admin(admin_conn, "POST", "/v1/keys", {"name": "latency"})
            key, key_id = created["key"], created["record"]["id"]
            while status_of(gateway_conn, key) != 200:
                pass
            admin(admin_conn, "POST", f"/v1/keys/{key_id}/revoke", {})
            answered = time.perf_counter()
            while status_of(gateway_conn, key) != 401:
                pass
            latencies.append((time.perf_counter() - answered) * 1000)
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=15)
        server.shutdown()

    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"mode={args.mode} rounds={len(latencies)} "
          f"p50={statistics.median(latencies):.2f}ms p99={p99:.2f}ms max={latencies[-1]:.2f}ms")


if __name__ == "__main__":
    main()
