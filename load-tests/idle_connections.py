#!/usr/bin/env python3
"""Resident memory per idle client connection: keygate beside HAProxy and nginx.

    load-tests/idle_connections.py                      # 2,000 connections, 3 rounds
    load-tests/idle_connections.py --connections 5000 --rounds 5
    load-tests/idle_connections.py --keygate target/release/keygate

Each proxy runs with one worker in front of the same small upstream, with timeouts far
above the measurement's length and room for every connection. For each proxy and round,
two kinds of idle connection are opened, N at a time:

  silent     connected, nothing sent (a slowloris before its first byte)
  keep-alive one request answered, then the connection is kept open

and the growth of the proxy's resident memory (VmRSS of the process and its children,
after the connections have settled) is divided by N; every measurement has a freshly
started proxy. Medians of the rounds are printed
and written to load-tests/results/idle_connections.md.

Needs haproxy and nginx (load-tests/run.sh installs them) and a release build of keygate
(cargo build --release --bin keygate).
"""

from __future__ import annotations

import argparse
import http.server
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("silent", "keep-alive")


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` and every descendant (nginx's workers), in KiB."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pending.extend(int(c) for c in children)
        except FileNotFoundError:
            continue
    return total


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_args) -> None:
        pass


def keygate_config(work: Path, port: int, admin: int, upstream: int, n: int) -> list[str]:
    (work / "keys.yaml").write_text("keys: []\n")
    (work / "keygate.yaml").write_text(
        f"""mode: gateway
node_id: idle-bench
threads: 1
listeners: [ {{ address: "127.0.0.1:{port}" }} ]
admin: {{ address: "127.0.0.1:{admin}" }}
keys: {{ source: file, file: {work}/keys.yaml }}
upstreams: {{ up: {{ targets: ["127.0.0.1:{upstream}"] }} }}
routes: [ {{ name: all, match: {{ path_prefix: / }}, upstream: up, auth: none }} ]
http: {{ request_header_timeout: 10m, idle_timeout: 10m, max_connections: {n * 2 + 100} }}
access_log: off
"""
    )
    return ["serve", "-c", str(work / "keygate.yaml")]


def haproxy_config(work: Path, port: int, upstream: int, n: int) -> list[str]:
    (work / "haproxy.cfg").write_text(
        f"""global
    nbthread 1
    maxconn {n * 2 + 100}
defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout http-request 10m
    timeout http-keep-alive 10m
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server up 127.0.0.1:{upstream}
"""
    )
    return ["-db", "-f", str(work / "haproxy.cfg")]


def nginx_config(work: Path, port: int, upstream: int, n: int) -> list[str]:
    (work / "nginx.conf").write_text(
        f"""daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections {n * 2 + 100}; }}
http {{
    access_log off;
    client_body_temp_path {work};
    proxy_temp_path {work};
    fastcgi_temp_path {work};
    uwsgi_temp_path {work};
    scgi_temp_path {work};
    client_header_timeout 10m;
    keepalive_timeout 10m;
    keepalive_requests 100000;
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""
    )
    return ["-p", str(work), "-c", str(work / "nginx.conf")]


def open_idle(port: int, n: int, kind: str) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if kind == "keep-alive":
            s.sendall(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while not data.endswith(b"ok"):
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("closed before the response")
                data += chunk
        conns.append(s)
    return conns


def measure(pid: int, port: int, n: int, kind: str) -> float:
    """KiB of resident memory per connection of `kind`."""
    # One request first, so buffers and pools every proxy allocates once are in the baseline.
    open_idle(port, 1, "keep-alive")[0].close()
    time.sleep(1.0)
    before = rss_kib(pid)
    conns = open_idle(port, n, kind)
    time.sleep(2.0)
    after = rss_kib(pid)
    for s in conns:
        s.close()
    return (after - before) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keygate", default=str(REPO / "target/release/keygate"))
    parser.add_argument("--out", default=str(HERE / "results/idle_connections.md"))
    args = parser.parse_args()
    n = args.connections

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, n * 3 + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < n * 2 + 200:
        print(f"error: the open-file limit ({wanted}) is too low for {n} connections", file=sys.stderr)
        return 1

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up_port = upstream.server_address[1]

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="keygate-idle-") as tmp:
        work = Path(tmp)
        for rnd in range(args.rounds):
            for proxy in ("keygate", "haproxy", "nginx"):
                # A fresh process per kind: memory freed by one measurement stays
                # with the allocator and would hide the next one's growth.
                for kind in KINDS:
                    port = free_port()
                    if proxy == "keygate":
                        cmd = [args.keygate, *keygate_config(work, port, free_port(), up_port, n)]
                    elif proxy == "haproxy":
                        cmd = ["haproxy", *haproxy_config(work, port, up_port, n)]
                    else:
                        cmd = ["nginx", *nginx_config(work, port, up_port, n)]
                    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        wait_port(port)
                        per = measure(proc.pid, port, n, kind)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=20)
                    results.setdefault(proxy, {}).setdefault(kind, []).append(per)
                    print(f"round {rnd + 1} {proxy:8} {kind:10} {per:7.1f} KiB per connection", flush=True)
    upstream.shutdown()

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        "unknown CPU",
    )
    lines = [
        "# Resident memory per idle client connection",
        "",
        f"`load-tests/idle_connections.py --connections {n} --rounds {args.rounds}`; {cpu}, "
        f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds; KiB of VmRSS growth per connection.",
        "",
        "| proxy | silent (nothing sent) | keep-alive (after one request) |",
        "|---|---|---|",
    ]
    for proxy, kinds in results.items():
        cells = [f"{statistics.median(kinds[kind]):.1f}" for kind in KINDS]
        lines.append(f"| {proxy} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
