#!/usr/bin/env bash
# Side-by-side load test of keygate, HAProxy and nginx + njs on this machine.
#
#   load-tests/run.sh                               # 5 interleaved rounds x 10 s (about 7 minutes)
#   load-tests/run.sh --duration 3 --rounds 1       # a quick check that everything works
#   load-tests/run.sh --proxy-cpus 2 --load-cpus 3  # other cores
#   load-tests/run.sh --help                        # every option (they are compare.py's)
#
# 1. installs wrk, HAProxy, nginx and njs from Debian's packages (apt-get) and matplotlib (pip)
#    when they are missing (--no-install skips this step)
# 2. builds target/release/keygate and the bare Pingora proxy of scenario (f)
#    (examples/pingora_passthrough.rs) when missing or older than the sources
# 3. runs load-tests/compare.py, which generates the keys, writes the configs into a
#    temporary directory, starts everything pinned with taskset, checks that HAProxy and
#    nginx do the same work as keygate (same request upstream, same answer to the client),
#    measures and reports (--check-only: the checks alone).
#
# Results go to load-tests/results/ (results.csv, results.json, summary.md, chart.png).
# Every process started is stopped when this script ends, also on failure or Ctrl-C.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

install=1
keep=0
args=()
for arg in "$@"; do
    case "$arg" in
        --no-install) install=0 ;;
        --keep-workdir) keep=1; args+=("$arg") ;;
        -h|--help) sed -n '2,19p' "$0"; echo; exec python3 "$here/compare.py" --help ;;
        *) args+=("$arg") ;;
    esac
done

# --- 1. tools --------------------------------------------------------------------------------
njs_module=/usr/lib/nginx/modules/ngx_http_js_module.so
if [ "$install" = 1 ]; then
    missing=0
    for tool in wrk haproxy nginx taskset; do
        command -v "$tool" >/dev/null 2>&1 || missing=1
    done
    [ -e "$njs_module" ] || missing=1
    if [ "$missing" = 1 ]; then
        echo "== installing wrk, haproxy, nginx, libnginx-mod-http-js (apt-get)"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk haproxy nginx libnginx-mod-http-js
    fi
    if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
        echo "== installing matplotlib (pip)"
        # Debian's own python3 refuses pip installs (PEP 668): its package is the fallback.
        python3 -m pip install --quiet matplotlib \
            || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib \
            || echo "warning: no matplotlib: the results will come without chart.png" >&2
    fi
fi
for tool in wrk haproxy nginx taskset python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not installed" >&2; exit 1; }
done
[ -e "$njs_module" ] || { echo "error: $njs_module is missing (apt-get install libnginx-mod-http-js)" >&2; exit 1; }

# --- 2. keygate --------------------------------------------------------------------------------
binary="$repo/target/release/keygate"
floor="$repo/target/release/examples/pingora_passthrough"
stale() {
    [ ! -x "$1" ] || [ -n "$(find "$repo/src" "$repo/examples" "$repo/Cargo.toml" "$repo/Cargo.lock" \
        "$repo/build.rs" -type f -newer "$1" -print -quit 2>/dev/null || true)" ]
}
if stale "$binary" || stale "$floor"; then
    echo "== building $binary and $floor (cargo build --release --locked --bin keygate --example pingora_passthrough; several minutes)"
    (cd "$repo" && cargo build --release --locked --bin keygate --example pingora_passthrough)
fi

# --- 3. measure ---------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/keygate-loadtest.XXXXXX")
child=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$child" 2>/dev/null || true
    fi
    # compare.py stops what it started; should it have been killed outright, every process
    # it started is listed here, each the leader of its own process group.
    if [ -f "$work/pids" ]; then
        while read -r pid; do
            [ -n "$pid" ] || continue
            kill -TERM -- "-$pid" 2>/dev/null || true
        done < "$work/pids"
        sleep 0.5
        while read -r pid; do
            [ -n "$pid" ] || continue
            kill -KILL -- "-$pid" 2>/dev/null || true
        done < "$work/pids"
    fi
    if [ "$keep" = 1 ]; then
        echo "work directory kept: $work"
    else
        rm -rf -- "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

echo "== measuring (configs and logs in $work)"
cd "$repo"
python3 "$here/compare.py" --keygate "$binary" --workdir "$work" "${args[@]}" &
child=$!
wait "$child"
