"""What the load-test scripts share: ports, a tiny upstream, waiting for a process to
answer, starting processes in their own process groups and stopping them all, and
reading a process's memory and CPU from /proc. Python standard library only."""

import http.client
import http.server
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# Ports for the processes a script starts, below Linux's ephemeral range (32768 and up by
# default): a port the kernel picked as free can be handed out again to an outgoing
# connection before the process meant to listen on it binds it, which happens when many
# connections open at once (a restart storm).
LISTEN_PORTS = range(20000, 32000)
_taken = set()


def free_port():
    for _ in range(1000):
        port = random.choice(LISTEN_PORTS)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


class Upstream(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 "ok"."""

    protocol_version = "HTTP/1.1"
    # Header and body in separate small writes would wait on a delayed ACK
    # (~40 ms) and make every poll that slow.
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def log_message(self, *args):
        pass


class _UpstreamServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A proxy killed mid-request resets its connections: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def start_upstream(port):
    """A threaded `Upstream` on 127.0.0.1:port; `.shutdown()` it at the end."""
    server = _UpstreamServer(("127.0.0.1", port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def http_status(port, path, timeout=1.0):
    """The status of one GET, or None when nothing answered."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()
    except OSError:
        return None


def wait_http(port, path="/healthz", timeout=30, alive=None, every=0.05):
    """Waits until GET `path` answers 200; returns the seconds waited. `alive`, when
    given, is called between tries (to stop early when the process died)."""
    started = time.monotonic()
    while True:
        if http_status(port, path) == 200:
            return time.monotonic() - started
        if alive is not None:
            alive()
        if time.monotonic() - started > timeout:
            sys.exit(f"GET 127.0.0.1:{port}{path} did not answer 200 within {timeout:g} s")
        time.sleep(every)


class Children:
    """Every process started here, each the leader of its own process group: a Ctrl-C
    in the terminal reaches only the script, which then stops them all in reverse
    order, group by group (children of children too)."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.procs = []  # (name, Popen, log path)

    def start(self, name, argv, env=None, cpus=None):
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)
        self.procs.append((name, popen, log))
        return popen

    def log_of(self, name):
        return self.workdir / f"{name}.log"

    def check_alive(self):
        """Exits naming the first child that died, with the end of its log."""
        for name, popen, log in self.procs:
            if popen.poll() is not None:
                sys.exit(f"{name} exited with {popen.returncode}; end of {log}:\n{log.read_text()[-2000:]}")

    def stop(self, name, timeout=60):
        """SIGTERM to one child's group, then waits for it; returns its exit status."""
        for i, (known, popen, _) in enumerate(self.procs):
            if known == name:
                del self.procs[i]
                return _terminate(name, popen, timeout)
        raise KeyError(name)

    def stop_all(self, timeout=15):
        for _, popen, _ in reversed(self.procs):
            if popen.poll() is None:
                _signal_group(popen, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, popen, _ in reversed(self.procs):
            try:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"warning: {name} did not stop on SIGTERM: killed", file=sys.stderr)
            # The group may outlive its leader (nginx's worker): always make sure.
            _signal_group(popen, signal.SIGKILL)
            popen.wait()
        self.procs.clear()


def _signal_group(popen, sig):
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass


def _terminate(name, popen, timeout):
    if popen.poll() is None:
        _signal_group(popen, signal.SIGTERM)
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"warning: {name} did not stop within {timeout} s of SIGTERM: killed", file=sys.stderr)
    _signal_group(popen, signal.SIGKILL)
    return popen.wait()


def exit_on_signals():
    """SIGTERM and SIGHUP end the script like Ctrl-C does, through its cleanup."""
    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def stopped_by_user(e):
    """Whether an exception is Ctrl-C or one of the signals of `exit_on_signals`."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and
                                                 str(e.code).startswith("stopped by signal"))


# --------------------------------------------------------------------------- /proc


def status_kib(pid, field):
    """A `VmRSS`/`VmHWM`-style field of /proc/<pid>/status, in KiB (None if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rss_bytes(pid):
    kib = status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes(pid):
    """VmHWM: the highest resident memory since start or since `reset_peak_rss`."""
    kib = status_kib(pid, "VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss(pid):
    """Writing 5 to clear_refs resets VmHWM to the current VmRSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class RssSampler:
    """Polls a process's VmRSS in a thread; `.stop()` returns the highest seen."""

    def __init__(self, pid, every=0.05):
        self.pid, self.every, self.highest = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.highest = max(self.highest, rss)
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.highest


def process_ticks(pid):
    """utime + stime (clock ticks) of a process, all its threads included."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def machine():
    """One line: CPU model, CPUs, memory, kernel."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    return f"{cpu}, {os.cpu_count()} CPUs, {mem_kib / 1024 / 1024:.0f} GiB, Linux {os.uname().release}"


# --------------------------------------------------------------------------- figures


def quantile(values, q):
    """Nearest-rank quantile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def mb(n):
    """Bytes for people: kB, MB or GB (powers of 1000)."""
    if n < 1e6:
        return f"{n / 1e3:,.1f} kB"
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def publish(text, out):
    """Prints a run's markdown and writes it to `out` (a Path)."""
    print()
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


def git_describe(repo):
    """`git describe --always --dirty` of the checkout, or "unknown"."""
    return subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


def describe_keygate(keygate, repo):
    """`keygate 0.1.0 (<commit>, release build)`: what a results table says it measured."""
    version = subprocess.run([keygate, "--version"], capture_output=True, text=True).stdout.strip() or "keygate"
    build = ("debug build: figures not representative" if "/debug/" in keygate else
             "release build" if "/release/" in keygate else keygate)
    return f"{version} ({git_describe(repo)}, {build})"
