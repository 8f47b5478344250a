#!/usr/bin/env python3
"""Side-by-side load test: keygate against HAProxy and nginx + njs on one machine.

Normally started by `load-tests/run.sh`, which installs the tools and builds keygate
first. See load-tests/README.md for what each scenario is and how the numbers are made.

Steps: generate keys -> write configs into a work directory -> start the upstream and
the proxies (each pinned with taskset) -> check that HAProxy and nginx send the upstream
the same request and the client the same answer as keygate (the upstream echoes what it
received) -> check that every proxy answers 200/401/403/429 where it should -> run wrk
rounds, every scenario once per round (A B C D E ... A B C D E ...) -> print medians and
ratios, write CSV, JSON and a PNG.
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
# Every proxy started, each pinned to the proxy CPU; "pingora" is the floor of (f),
# "haproxy-minimal" the minimal HAProxy configuration of (g), kept for reference.
PROXIES = ("keygate", "haproxy", "nginx-njs", "pingora", "haproxy-minimal")
# Scenario id -> the proxy process it talks to, for the peers compared with keygate (c).
PEER_PROXY = {"d": "haproxy", "e": "nginx-njs", "g": "haproxy-minimal"}

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


# Owners, plans and scopes of the benchmark keys, so that every identity header has
# something to carry: 300 owners in turn, every 500th key without an owner; every fourth
# key on plan `pro` (the same rate as the default `bench`), the others on the default
# plan; scopes in three sets, each holding the route's orders:read.
OWNERS = 300
DEFAULT_PLAN = "bench"
SCOPE_SETS = (["orders:read"], ["orders:read", "orders:write"], ["orders:read", "reports:read"])
# Rate limit (requests per second, burst the same) of each plan.
PLAN_RATES = {"bench": NEVER_REACHED_RATE, "pro": NEVER_REACHED_RATE, "limited": 1}


@dataclass
class KeyRecord:
    id: str
    raw: str
    owner: str | None
    plan: str | None  # None: keygate's default_plan
    scopes: list[str]
    cidr: str

    @property
    def plan_header(self) -> str:
        """What keygate sends as X-Keygate-Plan: the key's plan, else the default plan."""
        return self.plan or DEFAULT_PLAN

    @property
    def rate(self) -> int:
        return PLAN_RATES[self.plan_header]


@dataclass
class Keys:
    valid: list[str]  # key_00000 ... : orders:read (and more), allowlist 127.0.0.0/8, owners and plans
    unknown: list[str]  # well-formed, right checksum, in no keys file
    noscope: str  # key_noscope: scope orders:write only -> 403
    wrongip: str  # key_wrongip: allowlist 10.0.0.0/8 -> 403 from 127.0.0.1
    limited: str  # key_limited: plan limited, 1 request/s -> 429

    @staticmethod
    def generate(count: int, seed: int) -> "Keys":
        rng = random.Random(seed)
        valid = [make_key(rng) for _ in range(count)]
        unknown = [make_key(rng) for _ in range(count)]
        return Keys(valid, unknown, make_key(rng), make_key(rng), make_key(rng))

    def records(self) -> list[KeyRecord]:
        """Every key a proxy knows, with what keygate knows of it."""
        width = max(5, len(str(len(self.valid) - 1)))
        out = []
        for i, key in enumerate(self.valid):
            owner = None if i % 500 == 499 else f"org-{i % OWNERS:03d}"
            plan = "pro" if i % 4 == 0 else None
            out.append(KeyRecord(f"key_{i:0{width}d}", key, owner, plan, SCOPE_SETS[i % len(SCOPE_SETS)],
                                 "127.0.0.0/8"))
        out.append(KeyRecord("key_noscope", self.noscope, "org-noscope", None, ["orders:write"], "127.0.0.0/8"))
        out.append(KeyRecord("key_wrongip", self.wrongip, "org-wrongip", None, ["orders:read"], "10.0.0.0/8"))
        out.append(KeyRecord("key_limited", self.limited, "org-limited", "limited", ["orders:read"], "127.0.0.0/8"))
        return out


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

    files: dict[str, list[str]] = {name: [] for name in (
        "keygate-keys.yaml", "haproxy-keys.map", "haproxy-keys-minimal.map", "haproxy-allow.map",
        "haproxy-scopes.map", "haproxy-limits.map", "nginx-keys.map", "nginx-owners.map", "nginx-plans.map",
        "nginx-scope-headers.map", "nginx-limits.map", "nginx-remaining.map", "nginx-allow.map", "nginx-scopes.map")}
    f = files
    f["keygate-keys.yaml"].append("keys:")
    for r in keys.records():
        digest = sha256_hex(r.raw)
        kg = f["keygate-keys.yaml"]
        kg.append(f"  - id: {r.id}")
        kg.append(f'    hash: "sha256:{digest}"')
        if r.owner:
            kg.append(f"    owner: {r.owner}")
        if r.plan:
            kg.append(f"    plan: {r.plan}")
        kg.append(f"    scopes: [{', '.join(json.dumps(s) for s in r.scopes)}]")
        kg.append(f'    ip_allowlist: ["{r.cidr}"]')
        net = r.cidr.split("/")[0]
        scopes_header = " ".join(r.scopes)
        # HAProxy's `hex` converter prints upper case; the map holds what it prints. One
        # lookup gives the whole record, "<id>|<owner>|<plan>|<scopes>", as keygate's index does.
        f["haproxy-keys.map"].append(f"{digest.upper()} {r.id}|{r.owner or ''}|{r.plan_header}|{scopes_header}")
        f["haproxy-keys-minimal.map"].append(f"{digest.upper()} {r.id}")
        f["haproxy-allow.map"].append(f"{r.id}|{net} 1")
        f["haproxy-scopes.map"].extend(f"{r.id}|{s} 1" for s in r.scopes)
        f["nginx-keys.map"].append(f"{digest} {r.id};")
        if r.owner:
            f["nginx-owners.map"].append(f'{r.id} "{r.owner}";')
        f["nginx-plans.map"].append(f'{r.id} "{r.plan_header}";')
        f["nginx-scope-headers.map"].append(f'{r.id} "{scopes_header}";')
        f["nginx-allow.map"].append(f'"{r.id}|{net}" 1;')
        f["nginx-scopes.map"].extend(f'"{r.id}|{s}" 1;' for s in r.scopes)
        if r.rate != NEVER_REACHED_RATE:
            f["haproxy-limits.map"].append(f"{r.id} {r.rate}")
            f["nginx-limits.map"].append(f"{r.id} {r.rate};")
    # nginx cannot subtract: what RateLimit-Remaining says after one request, per limit.
    f["nginx-remaining.map"] = [f"{rate} {rate - 1};" for rate in sorted(set(PLAN_RATES.values()))]
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
        Scenario("g", "(g) HAProxy minimal (reference)", "haproxy-minimal", "/v1/orders", "valid", 200),
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
    common = {"DIR": w, "UPSTREAM_PORT": p["upstream"], "RATE": NEVER_REACHED_RATE, "THREADS": a.proxy_threads}
    up_conf = render("nginx-upstream.conf.tmpl", w / "nginx-upstream.conf",
                     {**common, "PORT": p["upstream"], "NJS_MODULE": NJS_MODULE})
    kg_conf = render("keygate.yaml.tmpl", w / "keygate.yaml",
                     {**common, "PORT": p["keygate"], "ADMIN_PORT": p["keygate-admin"]})
    ha_conf = render("haproxy.cfg.tmpl", w / "haproxy.cfg", {**common, "PORT": p["haproxy"]})
    hm_conf = render("haproxy-minimal.cfg.tmpl", w / "haproxy-minimal.cfg", {**common, "PORT": p["haproxy-minimal"]})
    ng_conf = render("nginx-njs.conf.tmpl", w / "nginx-njs.conf",
                     {**common, "PORT": p["nginx-njs"], "NJS_MODULE": NJS_MODULE})

    # Configs are checked before anything starts, so a broken one fails fast and clearly.
    checks = [
        ["nginx", "-t", "-q", "-p", str(w), "-c", str(up_conf)],
        ["nginx", "-t", "-q", "-p", str(w), "-c", str(ng_conf)],
        ["haproxy", "-c", "-q", "-f", str(ha_conf)],
        ["haproxy", "-c", "-q", "-f", str(hm_conf)],
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
    s.running["haproxy-minimal"] = s.procs.start("haproxy-minimal", ["haproxy", "-db", "-f", str(hm_conf)],
                                                 a.proxy_cpus)
    s.running["nginx-njs"] = s.procs.start("nginx-njs", ["nginx", "-p", str(w), "-c", str(ng_conf)], a.proxy_cpus)
    s.running["pingora"] = s.procs.start(
        "pingora", [str(a.pingora), f"127.0.0.1:{p['pingora']}", f"127.0.0.1:{p['upstream']}",
                    str(a.proxy_threads)], a.proxy_cpus)
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
    for name in ("keygate", "haproxy", "nginx-njs", "haproxy-minimal"):
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
    print(f"checks: all {len(rows)} answers as expected (200 / 401 / 403 / 429) on keygate, HAProxy, nginx + njs "
          f"and the minimal HAProxy")


# --------------------------------------------------------------------------- equivalence

# The host every check request names, so that the Host header does not carry the port of
# the proxy it went through.
CHECK_HOST = "api.bench.test"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")
VALID_ID = re.compile(r"^[!-~]{1,128}$")
# Forged headers: every spelling of what keygate sets, which it drops before it sets its own.
FORGED = {
    "X-Keygate-Key-Id": "key_forged", "X-Keygate-Owner": "org-forged", "X-Keygate-Plan": "forged",
    "X-Keygate-Scopes": "*", "X_Keygate_Key_Id": "key_forged", "X-Forwarded-For": "203.0.113.7",
    "X_Forwarded_For": "203.0.113.8", "X_Request_Id": "forged-id", "X-Custom_Name": "underscored",
}

# Differences a peer cannot avoid, each stated in load-tests/README.md. Every one that
# shows up is printed; any other difference fails the check.
# (peer, case kind or "*" for every case, "upstream"/"response", header) -> why
STATED: dict[tuple[str, str, str, str], str] = {
    ("d", "*", "response", "connection"):
        "HAProxy sends no Connection header on HTTP/1.1 answers it keeps open (keep-alive is the default)",
    ("e", "forged-other", "upstream", "x-keygate-admin"):
        "nginx cannot drop headers by prefix: an X-Keygate-* name other than the four it sets passes",
    ("e", "denial", "response", "server"): "nginx adds Server to the answers it writes itself",
}


@dataclass
class Case:
    name: str
    kind: str  # proxied / plain / forged-other / denial
    key: str | None
    headers: dict[str, str] = field(default_factory=dict)
    echo: bool = True
    repeat: int = 1  # sent this many times in a row: the last answer is compared, the others too


@dataclass
class Seen:
    """One answer: the client's view and, for echoed requests, the upstream's."""
    status: int
    response: list[tuple[str, str]]  # lower-case names, in order
    body: bytes
    upstream: dict | None  # the echo: method, target, version, headers


def check_request(port: int, case: Case) -> Seen:
    headers = {"Host": CHECK_HOST, **case.headers}
    if case.key is not None:
        headers["x-api-key"] = case.key
    if case.echo:
        headers["x-echo"] = "1"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v1/orders?page=2", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        response = [(k.lower(), v) for k, v in resp.getheaders()]
    finally:
        conn.close()
    upstream = None
    if case.echo and resp.status == 200:
        try:
            upstream = json.loads(body)
        except ValueError:
            upstream = {"unreadable echo": body[:200].decode("latin-1")}
    return Seen(resp.status, response, body, upstream)


def equivalence_cases(keys: Keys) -> list[Case]:
    records = keys.records()
    used: set[str] = set()

    def pick(pred) -> KeyRecord:
        # Away from the keys that wait_ready and check_answers use; each case a fresh key,
        # so that every proxy's rate state for it starts full.
        for r in records[100:len(keys.valid)]:
            if r.raw not in used and pred(r):
                used.add(r.raw)
                return r
        raise SystemExit("no benchmark key fits an equivalence case")

    owned = pick(lambda r: r.owner and r.plan is None and len(r.scopes) == 1)
    pro = pick(lambda r: r.owner and r.plan == "pro" and len(r.scopes) == 2)
    ownerless = pick(lambda r: r.owner is None)
    given_id = "client-req-0001.a/b:c"
    quoted_id = 'id-with-"quote"-and-\\'
    return [
        Case("valid key, owner, default plan, one scope", "proxied", owned.raw),
        Case("valid key, plan pro, two scopes", "proxied", pro.raw),
        Case("valid key without an owner", "proxied", ownerless.raw),
        Case("valid key, echo off (what the benchmark gets)", "plain", pick(bool).raw, echo=False),
        Case("valid X-Request-Id given", "proxied", pick(bool).raw, {"X-Request-Id": given_id}),
        Case("X-Request-Id of 129 characters (replaced)", "proxied", pick(bool).raw, {"X-Request-Id": "r" * 129}),
        Case("X-Request-Id with a space (replaced)", "proxied", pick(bool).raw, {"X-Request-Id": "a b"}),
        Case("forged identity headers, X-Forwarded-For, `_` names", "proxied", pick(bool).raw, dict(FORGED)),
        Case("forged X-Keygate-Admin", "forged-other", pick(bool).raw, {"X-Keygate-Admin": "1"}),
        Case("no key -> 401", "denial", None, echo=False),
        Case("unknown key, X-Request-Id with quote and backslash -> 401", "denial", keys.unknown[7],
             {"X-Request-Id": quoted_id}, echo=False),
        Case("empty key header -> 401", "denial", "", echo=False),
        Case("key without the scope -> 403", "denial", keys.noscope, echo=False),
        Case("key allowlisted for 10.0.0.0/8 only -> 403", "denial", keys.wrongip, echo=False),
        Case("1 request/s key, twice: 200 then 429", "denial", keys.limited, echo=False, repeat=2),
    ]


def normalize(case: Case, seen: Seen, problems: list[str]) -> dict:
    """What must be equal between proxies: generated request ids and dates become
    placeholders, after checking that each is well-formed and the same both ways."""
    sent_id = case.headers.get("X-Request-Id")
    kept = sent_id is not None and VALID_ID.match(sent_id) is not None

    def rid(value: str, where: str) -> str:
        if kept:
            if value != sent_id:
                problems.append(f"{where}: X-Request-Id {value!r}, not the valid one sent ({sent_id!r})")
            return value
        if not GENERATED_ID.match(value):
            problems.append(f"{where}: generated X-Request-Id {value!r} is not 32 lower-case hex digits")
        return "<generated>"

    response = []
    ids = []
    for name, value in seen.response:
        if name == "x-request-id":
            ids.append(value)
            value = rid(value, "response")
        elif name == "date":
            value = "<date>"
        elif name == "content-length" and seen.upstream is not None:
            value = "<length of the echo>"
        response.append((name, value))
    if not ids:
        problems.append("response: no X-Request-Id")
    body: object = seen.body.decode("latin-1")
    if seen.body.startswith(b"{") and seen.upstream is None:
        try:
            body = json.loads(seen.body)
            err = body.get("error", {}) if isinstance(body, dict) else {}
            if "request_id" in err:
                if ids and err["request_id"] != ids[0]:
                    problems.append(f"body: request_id {err['request_id']!r} is not the X-Request-Id {ids[0]!r}")
                err["request_id"] = rid(err["request_id"], "body")
        except ValueError:
            pass
    upstream = None
    if seen.upstream is not None:
        up = seen.upstream
        headers = []
        for name, value in up.get("headers", []):
            name = name.lower()
            if name == "x-request-id":
                if ids and value != ids[0]:
                    problems.append(f"upstream got X-Request-Id {value!r}, the client {ids[0]!r}")
                value = rid(value, "upstream")
            headers.append((name, value))
        upstream = {k: v for k, v in up.items() if k != "headers"}
        upstream["headers"] = headers
    elif case.echo and seen.status == 200:
        problems.append("no echo from the upstream")
    return {"status": seen.status, "response": response, "body": body, "upstream": upstream}


def header_diff(want: list[tuple[str, str]], got: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(header name, difference) for every name whose values differ; order between names
    is not compared, the order of one name's values is."""
    out = []
    wd: dict[str, list[str]] = {}
    gd: dict[str, list[str]] = {}
    for n, v in want:
        wd.setdefault(n, []).append(v)
    for n, v in got:
        gd.setdefault(n, []).append(v)
    for name in sorted(set(wd) | set(gd)):
        w, g = wd.get(name), gd.get(name)
        if w == g:
            continue
        if g is None:
            out.append((name, f"missing (keygate: {w})"))
        elif w is None:
            out.append((name, f"extra {g} (keygate has none)"))
        else:
            out.append((name, f"{g} (keygate: {w})"))
    return out


def check_equivalence(s: Setup, peers: list[str]) -> None:
    """The peers must send the upstream the same request as keygate (c), and give the
    client the same status, headers and body, for the same requests: otherwise they do
    less work and the comparison is unfair. Stops with the list of differences."""
    cases = equivalence_cases(s.keys)
    views: dict[str, list[list[dict]]] = {}
    own_problems: list[str] = []
    for pid in ["c", *peers]:
        proxy = "keygate" if pid == "c" else PEER_PROXY[pid]
        per_case = []
        for case in cases:
            answers = []
            for i in range(case.repeat):
                problems: list[str] = []
                answers.append(normalize(case, check_request(s.ports[proxy], case), problems))
                own_problems.extend(f"({pid}) {case.name}: {p}" for p in problems)
            per_case.append(answers)
        views[pid] = per_case

    failures = list(own_problems)
    stated: dict[tuple[str, str, str, str], list[str]] = {}
    for pid in peers:
        for case, want_all, got_all in zip(cases, views["c"], views[pid]):
            for n, (want, got) in enumerate(zip(want_all, got_all)):
                label = f"({pid}) {case.name}" + (f" [answer {n + 1}]" if case.repeat > 1 else "")
                diffs: list[tuple[str, str, str]] = []
                if want["status"] != got["status"]:
                    diffs.append(("status", "", f"{got['status']} (keygate: {want['status']})"))
                diffs += [("response", h, d) for h, d in header_diff(want["response"], got["response"])]
                if want["body"] != got["body"] and want["upstream"] is None:
                    diffs.append(("body", "", f"{got['body']!r} (keygate: {want['body']!r})"))
                wu, gu = want["upstream"], got["upstream"]
                if (wu is None) != (gu is None):
                    diffs.append(("upstream", "", f"echo {'missing' if gu is None else 'unexpected'}"))
                elif wu is not None:
                    for k in ("method", "target", "version"):
                        if wu.get(k) != gu.get(k):
                            diffs.append(("upstream", k, f"{gu.get(k)!r} (keygate: {wu.get(k)!r})"))
                    diffs += [("upstream", h, d) for h, d in header_diff(wu["headers"], gu["headers"])]
                for where, header, what in diffs:
                    why = STATED.get((pid, case.kind, where, header)) or STATED.get((pid, "*", where, header))
                    if why:
                        stated.setdefault((pid, where, header, why), []).append(case.name)
                    else:
                        failures.append(f"{label}: {where} {header} {what}".replace("  ", " "))
    names = {"d": "HAProxy", "e": "nginx + njs", "g": "the minimal HAProxy"}
    if s.args.verbose:
        for case, answers in zip(cases, views["c"]):
            print(f"  keygate, {case.name}: {answers[-1]}")
    for (pid, where, header, why), where_seen in stated.items():
        seen_in = "every case" if len(set(where_seen)) == len(cases) else ", ".join(dict.fromkeys(where_seen))
        print(f"  equivalence, stated difference: ({pid}) {where} {header}: {why} (in {seen_in})")
    if failures:
        for line in failures:
            print(f"  equivalence, DIFFERS: {line}")
        sys.exit(f"equivalence: {len(failures)} differences between keygate (c) and "
                 f"{', '.join(names[p] for p in peers)}: the peers would not be doing the same work "
                 "(see above; --verbose prints keygate's answers)")
    print(f"equivalence: {', '.join(f'({p}) {names[p]}' for p in peers)} send the upstream the same request and "
          f"the client the same answer as keygate (c) in all {len(cases)} cases"
          + (f" ({len(stated)} stated differences, above)" if stated else ""))


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


# The ratios reported: (numerator, denominator). Issue #16's targets are on CPU per
# request: keygate's own cost on top of Pingora.
RATIOS = (("c", "b"), ("c", "d"), ("c", "e"), ("c", "f"), ("b", "f"), ("c", "g"), ("d", "g"))
CPU_TARGETS = {("b", "f"): 1.05, ("c", "f"): 1.12}


def ratios(summary: list[dict]) -> list[dict]:
    by = {s["scenario"]: s for s in summary}
    out = []
    for num, den in RATIOS:
        if num in by and den in by:
            n, o = by[num], by[den]
            cpu = round(n["proxy_cpu_us_per_req"] / o["proxy_cpu_us_per_req"], 3)
            target = CPU_TARGETS.get((num, den))
            out.append({
                "ratio": f"({num})/({den})", "vs": o["label"],
                "rps": round(n["rps"] / o["rps"], 3),
                "cpu_per_req": cpu,
                "p99": round(n["p99_ms"] / o["p99_ms"], 3) if o["p99_ms"] else None,
                "cpu_target": target,
                "cpu_target_met": None if target is None else cpu <= target,
            })
    return out


def markdown(summary: list[dict], rat: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['rounds']} interleaved rounds x {meta['duration_s']:g} s per scenario, wrk -t{meta['wrk_threads']} "
        f"-c{meta['connections']}, {meta.get('proxy_threads', 1)} proxy worker thread(s) on CPU {meta['proxy_cpus']}, "
        f"wrk + upstream on CPU {meta['load_cpus']}; "
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
        lines += ["", "| ratio (medians) | req/s | CPU/req | p99 | CPU/req target (issue #16) |",
                  "|---|---:|---:|---:|---|"]
        for r in rat:
            target = "" if r["cpu_target"] is None else \
                f"≤ {r['cpu_target']:.2f}: {'met' if r['cpu_target_met'] else 'missed'}"
            p99 = f"{r['p99']:.2f}" if r["p99"] is not None else "-"
            lines.append(f"| {r['ratio']} | {r['rps']:.2f} | {r['cpu_per_req']:.2f} | {p99} | {target} |")
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
    ap.add_argument("--proxy-threads", type=int, default=1,
                    help="worker threads of every proxy: keygate's threads, HAProxy's nbthread, nginx's "
                         "worker_processes, the bare Pingora's (default 1)")
    ap.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the proxies (default 0)")
    ap.add_argument("--load-cpus", default="1", help="taskset CPU list for wrk and the upstream (default 1)")
    ap.add_argument("--keys", type=int, default=10_000, help="number of keys rotated (default 10000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the key generator")
    ap.add_argument("--denials", choices=["keygate", "all", "none"], default="keygate",
                    help="401/429 floods through keygate only (default), also HAProxy and nginx (all), or none")
    ap.add_argument("--only", default="", help="comma-separated scenario ids to run (a,b,c,d,e,f,g,c401,c429,...)")
    ap.add_argument("--equivalence", default="d,e",
                    help="peers that must send the upstream the same request and the client the same answers as "
                         "keygate (c) before anything is measured: d (HAProxy), e (nginx + njs), g (the minimal "
                         "HAProxy, which must fail); default d,e")
    ap.add_argument("--check-only", action="store_true", help="start everything, run the checks, measure nothing")
    ap.add_argument("--port-base", type=int, default=18100, help="first of 7 loopback ports (default 18100)")
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
    peers = [p for p in a.equivalence.split(",") if p]
    if set(peers) - set(PEER_PROXY):
        sys.exit(f"--equivalence takes d, e and g, not {a.equivalence}")
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
                 "nginx-njs": base + 4, "pingora": base + 5, "haproxy-minimal": base + 6}
        s = Setup(a, work, keys, ports, procs)
        start_everything(s)
        check_equivalence(s, peers)
        check_answers(s)
        if a.check_only:
            print("--check-only: not measuring")
            return

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
        "wrk_threads": a.wrk_threads, "proxy_threads": a.proxy_threads, "proxy_cpus": a.proxy_cpus, "load_cpus": a.load_cpus, "keys": a.keys,
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
