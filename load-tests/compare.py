#!/usr/bin/env python3
"""Side-by-side load test: keygate against HAProxy and nginx + njs on one machine.

Normally started by `load-tests/run.sh`, which installs the tools and builds keygate
first. See load-tests/README.md for what each scenario is and how the numbers are made.

Steps: generate keys -> write configs into a work directory -> start the upstream and
the three proxies (each pinned with taskset) -> check that every proxy answers
200/401/403/429 where it should -> run wrk rounds, every scenario once per round
(A B C D E ... A B C D E ...) -> print medians and ratios, write CSV, JSON and a PNG.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
# Every proxy started, each pinned to the proxy CPU; "pingora" is the floor of (f).
PROXIES = ("keygate", "haproxy", "nginx-njs", "pingora")

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_PREFIX = "kg_bench"
BODY_LEN = 32
CHECKSUM_LEN = 6
REQUIRED_SCOPE = "orders:read"
# The rate limit every benchmark key has: far above what one core can push.
NEVER_REACHED_RATE = 1_000_000


# --------------------------------------------------------------------------- keys


def checksum(text: str) -> str:
    """keygate's checksum: CRC32 of `<prefix>_<body>` in 6 zero-padded base62 digits."""
    crc = zlib.crc32(text.encode())
    out = []
    for _ in range(CHECKSUM_LEN):
        out.append(BASE62[crc % 62])
        crc //= 62
    return "".join(reversed(out))


def make_key(rng: random.Random, prefix: str = KEY_PREFIX) -> str:
    head = prefix + "_" + "".join(rng.choice(BASE62) for _ in range(BODY_LEN))
    return head + checksum(head)


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Keys:
    valid: list[str]  # key_00000 ... : scope orders:read, allowlist 127.0.0.0/8, plan bench
    unknown: list[str]  # well-formed, right checksum, in no keys file
    noscope: str  # key_noscope: scope orders:write only -> 403
    wrongip: str  # key_wrongip: allowlist 10.0.0.0/8 -> 403 from 127.0.0.1
    limited: str  # key_limited: 1 request/s -> 429

    @staticmethod
    def generate(count: int, seed: int) -> "Keys":
        rng = random.Random(seed)
        valid = [make_key(rng) for _ in range(count)]
        unknown = [make_key(rng) for _ in range(count)]
        return Keys(valid, unknown, make_key(rng), make_key(rng), make_key(rng))

    def records(self):
        """(id, raw key, scopes, allowlist CIDR, plan) for every key a proxy knows."""
        width = max(5, len(str(len(self.valid) - 1)))
        for i, key in enumerate(self.valid):
            yield f"key_{i:0{width}d}", key, ["orders:read"], "127.0.0.0/8", None
        yield "key_noscope", self.noscope, ["orders:write"], "127.0.0.0/8", None
        yield "key_wrongip", self.wrongip, ["orders:read"], "10.0.0.0/8", None
        yield "key_limited", self.limited, ["orders:read"], "127.0.0.0/8", "limited"


def verify_keys_with_keygate(keygate: Path, keys: Keys) -> None:
    """Our key format and hashes must be keygate's own: checked against its CLI."""
    out = subprocess.run([str(keygate), "gen-key", "--prefix", KEY_PREFIX], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    raw, digest = out[0], out[1]
    if checksum(raw[:-CHECKSUM_LEN]) != raw[-CHECKSUM_LEN:]:
        sys.exit(f"checksum mismatch: our CRC32/base62 disagrees with `keygate gen-key` ({raw})")
    if digest != "sha256:" + sha256_hex(raw):
        sys.exit("hash mismatch with `keygate gen-key`")
    for key in keys.valid[:3] + keys.unknown[:1] + [keys.limited]:
        r = subprocess.run([str(keygate), "hash-key"], input=key, capture_output=True, text=True, check=True,
                           timeout=30)
        if r.stdout.strip() != "sha256:" + sha256_hex(key):
            sys.exit(f"hash mismatch with `keygate hash-key` for {key}")
        if "not a well-formed" in r.stderr:
            sys.exit(f"`keygate hash-key` says {key} is not well-formed: the generator is wrong")
    print(f"keys: generated format and hashes agree with `keygate gen-key` / `keygate hash-key`")


def write_key_files(work: Path, keys: Keys) -> None:
    (work / "keys-valid.txt").write_text("\n".join(keys.valid) + "\n")
    (work / "keys-unknown.txt").write_text("\n".join(keys.unknown) + "\n")
    (work / "keys-limited.txt").write_text(keys.limited + "\n")

    kg, hk, ha, hs, hl, nk, na, ns = [], [], [], [], [], [], [], []
    kg.append("keys:")
    for kid, raw, scopes, cidr, plan in keys.records():
        digest = sha256_hex(raw)
        kg.append(f"  - id: {kid}")
        kg.append(f'    hash: "sha256:{digest}"')
        kg.append(f"    scopes: [{', '.join(json.dumps(s) for s in scopes)}]")
        kg.append(f'    ip_allowlist: ["{cidr}"]')
        if plan:
            kg.append(f"    plan: {plan}")
        net = cidr.split("/")[0]
        # HAProxy's `hex` converter prints upper case; the map holds what it prints.
        hk.append(f"{digest.upper()} {kid}")
        ha.append(f"{kid}|{net} 1")
        hs.extend(f"{kid}|{s} 1" for s in scopes)
        nk.append(f"{digest} {kid};")
        na.append(f'"{kid}|{net}" 1;')
        ns.extend(f'"{kid}|{s}" 1;' for s in scopes)
        if plan == "limited":
            hl.append(f"{kid} 1")
    files = {
        "keygate-keys.yaml": kg, "haproxy-keys.map": hk, "haproxy-allow.map": ha, "haproxy-scopes.map": hs,
        "haproxy-limits.map": hl, "nginx-keys.map": nk, "nginx-allow.map": na, "nginx-scopes.map": ns,
    }
    for name, lines in files.items():
        (work / name).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class Processes:
    """Every process started here, each in its own session (process group = its pid),
    so that stopping it stops its children too (nginx workers). Their pids are also
    written to <work>/pids for run.sh's trap, in case this script is killed hard."""

    def __init__(self, work: Path):
        self.work = work
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], cpus: str) -> Proc:
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(["taskset", "-c", cpus, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        with open(self.work / "pids", "a") as f:
            f.write(f"{popen.pid}\n")
        return proc

    def run_bounded(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Runs a short-lived command (wrk) to its end, listed in <work>/pids while it runs."""
        with open(self.work / "pids", "a") as f:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
            f.write(f"{popen.pid}\n")
        try:
            out, err = popen.communicate(timeout=timeout)
        finally:
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
            self._write_pids()
        return subprocess.CompletedProcess(argv, popen.returncode, out, err)

    def _write_pids(self) -> None:
        (self.work / "pids").write_text("".join(f"{p.pid}\n" for p in self.procs))

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (nginx workers): always make sure
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                print(f"warning: {proc.name} (pid {proc.pid}) did not stop", file=sys.stderr)
                return  # leave <work>/pids for run.sh to try again
        self.procs.clear()
        (self.work / "pids").unlink(missing_ok=True)


def proc_tree_ticks(root: int) -> int:
    """utime + stime (clock ticks) of `root` and every live descendant, from /proc/<pid>/stat."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(p for p, (ppid, _) in stats.items() if ppid == pid)
    return total


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(port: int, path: str, key: str | None, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"x-api-key": key} if key is not None else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, path: str, key: str | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            sys.exit(f"{proc.name} exited with {proc.popen.returncode}; its log:\n{proc.log.read_text()[-3000:]}")
        try:
            status = http_get(port, path, key, timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    sys.exit(f"{proc.name} not ready on port {port} after {timeout:.0f}s ({last}); log: {proc.log}")


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    id: str
    label: str
    proxy: str  # which process's CPU time counts: upstream / keygate / haproxy / nginx-njs / pingora
    path: str
    keyset: str  # valid / unknown / limited
    expect: int  # the status nearly every response should have

    def keys_file(self, work: Path) -> Path:
        return work / f"keys-{self.keyset}.txt"


def scenarios(denials: str) -> list[Scenario]:
    out = [
        Scenario("a", "(a) direct to upstream", "upstream", "/v1/orders", "valid", 200),
        Scenario("b", "(b) keygate auth: none", "keygate", "/open/orders", "valid", 200),
        Scenario("c", "(c) keygate enforced", "keygate", "/v1/orders", "valid", 200),
        Scenario("d", "(d) HAProxy equivalent", "haproxy", "/v1/orders", "valid", 200),
        Scenario("e", "(e) nginx + njs equivalent", "nginx-njs", "/v1/orders", "valid", 200),
        Scenario("f", "(f) bare Pingora, no auth (floor)", "pingora", "/v1/orders", "valid", 200),
    ]
    peers = {"none": [], "keygate": ["c"], "all": ["c", "d", "e"]}[denials]
    names = {"c": "keygate", "d": "HAProxy", "e": "nginx + njs"}
    proxy = {"c": "keygate", "d": "haproxy", "e": "nginx-njs"}
    for p in peers:
        out.append(Scenario(f"{p}401", f"({p}) {names[p]}: unknown keys -> 401", proxy[p], "/v1/orders", "unknown", 401))
    for p in peers:
        out.append(Scenario(f"{p}429", f"({p}) {names[p]}: rate-limited key -> 429", proxy[p], "/v1/orders", "limited",
                            429))
    return out


@dataclass
class Setup:
    args: argparse.Namespace
    work: Path
    keys: Keys
    ports: dict[str, int]
    procs: Processes
    running: dict[str, Proc] = field(default_factory=dict)


def render(template: str, dest: Path, values: dict[str, object]) -> Path:
    text = (HERE / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", str(value))
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise SystemExit(f"{template}: placeholders left unfilled: {', '.join(sorted(set(left)))}")
    dest.write_text(text)
    return dest


def start_everything(s: Setup) -> None:
    a, w, p = s.args, s.work, s.ports
    for name, port in p.items():
        if port_open(port):
            sys.exit(f"port {port} ({name}) is already in use on 127.0.0.1; choose another --port-base")
    for d in ("upstream-tmp", "nginx-njs-tmp"):
        (w / d).mkdir(exist_ok=True)
    for js in ("keys.js", "echo.js"):
        (w / js).write_text((HERE / js).read_text())
    common = {"DIR": w, "UPSTREAM_PORT": p["upstream"], "RATE": NEVER_REACHED_RATE}
    up_conf = render("nginx-upstream.conf.tmpl", w / "nginx-upstream.conf",
                     {**common, "PORT": p["upstream"], "NJS_MODULE": NJS_MODULE})
    kg_conf = render("keygate.yaml.tmpl", w / "keygate.yaml",
                     {**common, "PORT": p["keygate"], "ADMIN_PORT": p["keygate-admin"]})
    ha_conf = render("haproxy.cfg.tmpl", w / "haproxy.cfg", {**common, "PORT": p["haproxy"]})
    ng_conf = render("nginx-njs.conf.tmpl", w / "nginx-njs.conf",
                     {**common, "PORT": p["nginx-njs"], "NJS_MODULE": NJS_MODULE})

    # Configs are checked before anything starts, so a broken one fails fast and clearly.
    checks = [
        ["nginx", "-t", "-q", "-p", str(w), "-c", str(up_conf)],
        ["nginx", "-t", "-q", "-p", str(w), "-c", str(ng_conf)],
        ["haproxy", "-c", "-q", "-f", str(ha_conf)],
        [str(a.keygate), "check-config", "-c", str(kg_conf)],
    ]
    for cmd in checks:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            sys.exit(f"config check failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")

    valid = s.keys.valid[0]
    s.running["upstream"] = s.procs.start("upstream", ["nginx", "-p", str(w), "-c", str(up_conf)], a.load_cpus)
    wait_ready(s.running["upstream"], p["upstream"], "/", None)
    env_log = os.environ.get("KEYGATE_LOG", "warn")
    os.environ["KEYGATE_LOG"] = env_log
    s.running["keygate"] = s.procs.start("keygate", [str(a.keygate), "serve", "-c", str(kg_conf)], a.proxy_cpus)
    s.running["haproxy"] = s.procs.start("haproxy", ["haproxy", "-db", "-f", str(ha_conf)], a.proxy_cpus)
    s.running["nginx-njs"] = s.procs.start("nginx-njs", ["nginx", "-p", str(w), "-c", str(ng_conf)], a.proxy_cpus)
    s.running["pingora"] = s.procs.start(
        "pingora", [str(a.pingora), f"127.0.0.1:{p['pingora']}", f"127.0.0.1:{p['upstream']}"], a.proxy_cpus)
    for name in PROXIES:
        wait_ready(s.running[name], p[name], "/v1/orders", valid)
    print(f"started: upstream pid {s.running['upstream'].pid} (CPU {a.load_cpus}); "
          + ", ".join(f"{n} pid {s.running[n].pid}" for n in PROXIES)
          + f" (CPU {a.proxy_cpus})")


def check_answers(s: Setup) -> None:
    """The three enforcing proxies must agree on who gets in: otherwise the comparison is void."""
    k, p = s.keys, s.ports
    cases = [
        ("valid key", k.valid[len(k.valid) // 2], 200),
        ("unknown key", k.unknown[0], 401),
        ("no key", None, 401),
        ("key without the scope", k.noscope, 403),
        ("key allowlisted for 10.0.0.0/8 only", k.wrongip, 403),
    ]
    rows, failed = [], False
    for name in ("keygate", "haproxy", "nginx-njs"):
        for what, key, want in cases:
            got = http_get(p[name], "/v1/orders", key)
            rows.append((name, what, want, got))
            failed |= got != want
        # the 1 request/s key: a quick burst must hit 429
        got = [http_get(p[name], "/v1/orders", k.limited) for _ in range(5)]
        rows.append((name, "5 quick requests with key_limited", 429, got))
        failed |= 429 not in got
    got = http_get(p["keygate"], "/open/orders", None)
    rows.append(("keygate", "auth: none route, no key", 200, got))
    failed |= got != 200
    got = http_get(p["pingora"], "/v1/orders", None)
    rows.append(("pingora", "passthrough, no key", 200, got))
    failed |= got != 200
    if failed or s.args.verbose:
        for row in rows:
            print("  check: %-9s %-38s want %s got %s" % row)
    if failed:
        sys.exit("the proxies do not answer as expected: see the checks above and the logs in " + str(s.work))
    print(f"checks: all {len(rows)} answers as expected (200 / 401 / 403 / 429) on keygate, HAProxy, nginx + njs")


def run_wrk(s: Setup, sc: Scenario, duration: float) -> dict:
    a = s.args
    port = s.ports[sc.proxy]
    cmd = ["taskset", "-c", a.load_cpus, "wrk", "-t", str(a.wrk_threads), "-c", str(a.connections),
           "-d", f"{duration:g}s", "--timeout", "5s", "-s", str(HERE / "rotate_keys.lua"),
           f"http://127.0.0.1:{port}{sc.path}", "--", str(sc.keys_file(s.work))]
    proxy_pid = s.running[sc.proxy].pid
    upstream_pid = s.running["upstream"].pid
    before = (proc_tree_ticks(proxy_pid), proc_tree_ticks(upstream_pid), time.monotonic())
    r = s.procs.run_bounded(cmd, timeout=duration + 60)
    after = (proc_tree_ticks(proxy_pid), proc_tree_ticks(upstream_pid), time.monotonic())
    line = next((l for l in r.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if r.returncode != 0 or line is None:
        sys.exit(f"wrk failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    for name in (*PROXIES, "upstream"):
        if s.running[name].popen.poll() is not None:
            sys.exit(f"{name} died during {sc.id}; log: {s.running[name].log}")
    w = json.loads(line[len("WRKJSON "):])
    seconds = w["duration_us"] / 1e6
    n = max(1, w["requests"])
    proxy_cpu = (after[0] - before[0]) / CLK_TCK
    upstream_cpu = (after[1] - before[1]) / CLK_TCK
    non2xx = w["errors_status"]  # wrk counts every status >= 400 here (none of ours are 3xx)
    if sc.expect == 200:
        unexpected = non2xx
    else:
        unexpected = w["requests"] - non2xx
        if sc.keyset == "limited":  # its 1 request/s gets through: those 200s are expected
            unexpected = max(0, unexpected - (int(seconds) + 2))
    return {
        "scenario": sc.id, "label": sc.label, "proxy": sc.proxy, "expect": sc.expect,
        "requests": w["requests"], "duration_s": round(seconds, 3), "rps": round(w["requests"] / seconds, 1),
        "p50_ms": w["lat_p50_us"] / 1000, "p90_ms": w["lat_p90_us"] / 1000, "p99_ms": w["lat_p99_us"] / 1000,
        "p999_ms": w["lat_p999_us"] / 1000, "max_ms": w["lat_max_us"] / 1000, "mean_ms": round(w["lat_mean_us"] / 1000, 4),
        "proxy_cpu_s": round(proxy_cpu, 2), "proxy_cpu_us_per_req": round(proxy_cpu * 1e6 / n, 3),
        "proxy_cpu_busy": round(proxy_cpu / (after[2] - before[2]), 3),
        "upstream_cpu_us_per_req": round(upstream_cpu * 1e6 / n, 3),
        "non_2xx": non2xx, "unexpected_status": unexpected,
        "socket_errors": w["errors_connect"] + w["errors_read"] + w["errors_write"] + w["errors_timeout"],
    }


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict], order: list[Scenario]) -> list[dict]:
    out = []
    for sc in order:
        mine = [r for r in runs if r["scenario"] == sc.id]
        if not mine:
            continue
        med = lambda k: statistics.median(r[k] for r in mine)  # noqa: E731
        out.append({
            "scenario": sc.id, "label": sc.label, "proxy": sc.proxy, "expect": sc.expect, "runs": len(mine),
            "rps": med("rps"), "rps_min": min(r["rps"] for r in mine), "rps_max": max(r["rps"] for r in mine),
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "proxy_cpu_us_per_req": round(med("proxy_cpu_us_per_req"), 2),
            "proxy_cpu_us_min": min(r["proxy_cpu_us_per_req"] for r in mine),
            "proxy_cpu_us_max": max(r["proxy_cpu_us_per_req"] for r in mine),
            "proxy_cpu_busy": med("proxy_cpu_busy"),
            "upstream_cpu_us_per_req": round(med("upstream_cpu_us_per_req"), 2),
            "unexpected_status": sum(r["unexpected_status"] for r in mine),
            "socket_errors": sum(r["socket_errors"] for r in mine),
        })
    return out


def ratios(summary: list[dict]) -> list[dict]:
    by = {s["scenario"]: s for s in summary}
    out = []
    for other in ("b", "d", "e", "f"):
        if "c" in by and other in by:
            c, o = by["c"], by[other]
            out.append({
                "ratio": f"(c)/({other})", "vs": o["label"],
                "rps": round(c["rps"] / o["rps"], 3),
                "cpu_per_req": round(c["proxy_cpu_us_per_req"] / o["proxy_cpu_us_per_req"], 3),
                "p99": round(c["p99_ms"] / o["p99_ms"], 3) if o["p99_ms"] else None,
            })
    return out


def markdown(summary: list[dict], rat: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['rounds']} interleaved rounds x {meta['duration_s']:g} s per scenario, wrk -t{meta['wrk_threads']} "
        f"-c{meta['connections']}, proxy on CPU {meta['proxy_cpus']}, wrk + upstream on CPU {meta['load_cpus']}; "
        f"medians.",
        "",
        "| scenario | req/s | p50 ms | p99 ms | proxy CPU µs/req | proxy core busy | unexpected statuses |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        cpu = f"{s['proxy_cpu_us_per_req']:.1f}" if s["proxy"] != "upstream" else \
            f"({s['proxy_cpu_us_per_req']:.1f} upstream)"
        lines.append(f"| {s['label']} | {s['rps']:,.0f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {cpu} | "
                     f"{s['proxy_cpu_busy'] * 100:.0f}% | {s['unexpected_status']} |")
    if rat:
        lines += ["", "| ratio (medians) | req/s | CPU/req | p99 |", "|---|---:|---:|---:|"]
        for r in rat:
            lines.append(f"| {r['ratio']} | {r['rps']:.2f} | {r['cpu_per_req']:.2f} | {r['p99']:.2f} |")
    return "\n".join(lines) + "\n"


def chart(summary: list[dict], meta: dict, dest: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not importable: no chart (run.sh installs it)", file=sys.stderr)
        return False
    labels = [s["label"] for s in summary][::-1]
    rows = summary[::-1]
    colors = ["#2f6fb0" if s["proxy"] == "keygate" else "#999999" for s in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(rows) + 2.2), sharey=True)
    y = range(len(rows))
    ax = axes[0]
    ax.barh(y, [s["rps"] / 1000 for s in rows], color=colors,
            xerr=[[max(0, s["rps"] - s["rps_min"]) / 1000 for s in rows],
                  [max(0, s["rps_max"] - s["rps"]) / 1000 for s in rows]])
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("thousand requests/s (median, min–max)")
    for i, row in enumerate(rows):
        ax.annotate(f"{row['rps'] / 1000:.1f}k", (row["rps"] / 1000, i), xytext=(4, 3), textcoords="offset points",
                    fontsize=8, va="bottom")
    ax = axes[1]
    ax.barh(y, [s["proxy_cpu_us_per_req"] if s["proxy"] != "upstream" else 0 for s in rows], color=colors,
            xerr=[[0 if s["proxy"] == "upstream" else max(0, s["proxy_cpu_us_per_req"] - s["proxy_cpu_us_min"])
                   for s in rows],
                  [0 if s["proxy"] == "upstream" else max(0, s["proxy_cpu_us_max"] - s["proxy_cpu_us_per_req"])
                   for s in rows]])
    ax.set_xlabel("proxy CPU µs per request (utime+stime)")
    for i, row in enumerate(rows):
        text = "no proxy" if row["proxy"] == "upstream" else f"{row['proxy_cpu_us_per_req']:.1f}"
        ax.annotate(text, (0 if row["proxy"] == "upstream" else row["proxy_cpu_us_per_req"], i), xytext=(4, 3),
                    textcoords="offset points", fontsize=8, va="bottom")
    ax = axes[2]
    h = 0.38
    ax.barh([i + h / 2 for i in y], [s["p50_ms"] for s in rows], height=h, color=colors, alpha=0.55, label="p50")
    ax.barh([i - h / 2 for i in y], [s["p99_ms"] for s in rows], height=h, color=colors, label="p99")
    ax.set_xlabel("latency ms (p50 light, p99 dark)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"keygate vs HAProxy vs nginx+njs — one proxy core, {meta['keys']:,} rotating keys, "
                 f"{meta['rounds']}×{meta['duration_s']:g} s interleaved, medians ({meta['cpu_model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the whole machine used over `seconds` (from /proc/stat)."""
    def sample():
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = f[3] + f[4]
        return sum(f[:8]) - idle, sum(f[:8])
    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def versions(keygate: Path) -> dict:
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "keygate": out([str(keygate), "--version"]), "haproxy": out(["haproxy", "-v"]),
        "nginx": out(["nginx", "-v"]), "njs": out(["dpkg-query", "-W", "libnginx-mod-http-js"]),
        "wrk": out(["wrk", "-v"]), "kernel": os.uname().release, "nproc": os.cpu_count(), "cpu_model": cpu,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per run (default 10)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are over these (default 5)")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of unrecorded load per scenario first (default 2)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the proxies (default 0)")
    ap.add_argument("--load-cpus", default="1", help="taskset CPU list for wrk and the upstream (default 1)")
    ap.add_argument("--keys", type=int, default=10_000, help="number of keys rotated (default 10000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the key generator")
    ap.add_argument("--denials", choices=["keygate", "all", "none"], default="keygate",
                    help="401/429 floods through keygate only (default), also HAProxy and nginx (all), or none")
    ap.add_argument("--only", default="", help="comma-separated scenario ids to run (a,b,c,d,e,c401,c429,...)")
    ap.add_argument("--port-base", type=int, default=18100, help="first of 6 loopback ports (default 18100)")
    ap.add_argument("--keygate", type=Path, default=REPO / "target/release/keygate")
    ap.add_argument("--pingora", type=Path, default=REPO / "target/release/examples/pingora_passthrough",
                    help="the bare Pingora proxy of scenario (f) (examples/pingora_passthrough.rs)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where results go (default load-tests/results)")
    ap.add_argument("--workdir", type=Path, help="configs, keys and logs (default: a new temp dir, removed after)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, logs) afterwards")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if a.rounds < 1 or a.duration <= 0:
        sys.exit("--rounds must be >= 1 and --duration > 0")
    for binary in (a.keygate, a.pingora):
        if not binary.exists():
            sys.exit(f"{binary} does not exist: build it with "
                     "`cargo build --release --locked --bin keygate --example pingora_passthrough`")

    order = scenarios(a.denials)
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - {sc.id for sc in scenarios("all")}
        if unknown:
            sys.exit(f"unknown scenario ids: {', '.join(sorted(unknown))}")
        order = [sc for sc in scenarios("all") if sc.id in wanted]

    own_workdir = a.workdir is None
    work = Path(tempfile.mkdtemp(prefix="keygate-loadtest-")) if own_workdir else a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    procs = Processes(work)

    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    background = busy_cores()
    if background > 0.15:
        print(f"warning: this machine is not idle ({background:.2f} cores busy before starting): "
              f"other work will disturb the numbers", file=sys.stderr)
    try:
        keys = Keys.generate(a.keys, a.seed)
        verify_keys_with_keygate(a.keygate, keys)
        write_key_files(work, keys)
        base = a.port_base
        ports = {"upstream": base, "keygate": base + 1, "keygate-admin": base + 2, "haproxy": base + 3,
                 "nginx-njs": base + 4, "pingora": base + 5}
        s = Setup(a, work, keys, ports, procs)
        start_everything(s)
        check_answers(s)

        if a.warmup > 0:
            print(f"warm-up: {a.warmup:g} s per scenario, not recorded")
            for sc in order:
                run_wrk(s, sc, a.warmup)

        runs = []
        total = a.rounds * len(order)
        print(f"measuring: {a.rounds} rounds x {len(order)} scenarios x {a.duration:g} s "
              f"(~{total * (a.duration + 0.5) / 60:.1f} min)")
        for rnd in range(1, a.rounds + 1):
            for sc in order:
                r = run_wrk(s, sc, a.duration)
                r["round"] = rnd
                runs.append(r)
                print(f"  round {rnd} {sc.id:>4}: {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                      f"p99 {r['p99_ms']:.3f} ms  {sc.proxy} CPU {r['proxy_cpu_us_per_req']:.1f} µs/req  "
                      f"busy {r['proxy_cpu_busy'] * 100:.0f}%"
                      + (f"  UNEXPECTED {r['unexpected_status']}" if r["unexpected_status"] else ""), flush=True)
                time.sleep(0.3)
    finally:
        procs.stop_all()
        if own_workdir and not a.keep_workdir:
            subprocess.run(["rm", "-rf", "--", str(work)], check=False)
        elif own_workdir:
            print(f"work directory (configs, keys, logs): {work}")

    meta = {
        "rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup, "connections": a.connections,
        "wrk_threads": a.wrk_threads, "proxy_cpus": a.proxy_cpus, "load_cpus": a.load_cpus, "keys": a.keys,
        "denials": a.denials, "started": started,
        "command": " ".join(sys.argv), "busy_cores_before": round(background, 3), **versions(a.keygate),
    }
    summary = summarize(runs, order)
    rat = ratios(summary)
    table = markdown(summary, rat, meta)
    print()
    print(table)

    a.out.mkdir(parents=True, exist_ok=True)
    fields = ["round", *[k for k in runs[0] if k != "round"]]
    with open(a.out / "results.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(runs)
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "ratios": rat, "runs": runs},
                                                   indent=2, ensure_ascii=False) + "\n")
    (a.out / "summary.md").write_text(table)
    wrote = ["results.csv", "results.json", "summary.md"]
    if chart(summary, meta, a.out / "chart.png"):
        wrote.append("chart.png")
    print(f"wrote {', '.join(str(a.out / w) for w in wrote)}")
    if any(s["unexpected_status"] or s["socket_errors"] for s in summary):
        print("warning: some runs had unexpected statuses or socket errors (see results.csv)", file=sys.stderr)


if __name__ == "__main__":
    main()
