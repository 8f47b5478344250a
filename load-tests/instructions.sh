#!/usr/bin/env bash
# Instructions per request of a proxy under load, counted by callgrind: unlike CPU time,
# the count does not depend on what else the machine is doing, so two builds can be
# compared on a busy or noisy machine.
#
#   load-tests/run.sh --only a --rounds 1 --duration 1 --keep-workdir   # makes a work dir
#   load-tests/instructions.sh WORKDIR c                # keygate, scenario (c)
#   load-tests/instructions.sh WORKDIR b                # keygate, scenario (b)
#   load-tests/instructions.sh WORKDIR f                # the bare Pingora proxy of (f)
#   load-tests/instructions.sh WORKDIR ft               # (f) with keygate's upstream timeouts
#   KEYGATE=/tmp/other-build load-tests/instructions.sh WORKDIR c
#   PROFILE=c.callgrind load-tests/instructions.sh WORKDIR c   # keeps the profile
#
# The proxy runs under valgrind (about 50 times slower); wrk sends 3 s of warm-up, the
# counters are zeroed, then 10 s of load are counted (8 connections, the work dir's
# 10,000 rotating keys). Needs valgrind (callgrind_control, callgrind_annotate: `apt-get
# install valgrind`), curl, and the wrk and nginx that run.sh installs. Ports: those of the
# work dir's configs (18100-18102) and 18105 for (f).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:?usage: instructions.sh WORKDIR b|c|f|ft}
scenario=${2:?usage: instructions.sh WORKDIR b|c|f|ft}
keygate=${KEYGATE:-$repo/target/release/keygate}
floor=${PINGORA:-$repo/target/release/examples/pingora_passthrough}
for tool in valgrind callgrind_control callgrind_annotate curl wrk nginx taskset; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not installed" >&2; exit 1; }
done
[ -f "$work/keygate.yaml" ] || { echo "error: $work is not a work dir of run.sh --keep-workdir" >&2; exit 1; }
out=$(mktemp -d "${TMPDIR:-/tmp}/keygate-callgrind.XXXXXX")

upstream_port=$(sed -n 's/.*listen 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/nginx-upstream.conf" | head -1)
proxy_port=$(sed -n '/^listeners:/,/address:/s/.*address: *127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/keygate.yaml")
case $scenario in
    b) path=/open/orders; command=("$keygate" serve -c "$work/keygate.yaml") ;;
    c) path=/v1/orders; command=("$keygate" serve -c "$work/keygate.yaml") ;;
    f) path=/v1/orders; proxy_port=18105
       command=("$floor" "127.0.0.1:$proxy_port" "127.0.0.1:$upstream_port") ;;
    ft) path=/v1/orders; proxy_port=18105
       command=("$floor" --upstream-timeouts "127.0.0.1:$proxy_port" "127.0.0.1:$upstream_port") ;;
    *) echo "scenario must be b, c, f or ft" >&2; exit 2 ;;
esac

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT INT TERM

taskset -c 1 nginx -p "$work" -c "$work/nginx-upstream.conf" &
pids+=($!)
KEYGATE_LOG=warn taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
    "${command[@]}" >"$out/proxy.log" 2>&1 &
proxy=$!
pids+=("$proxy")
ready=""
for _ in $(seq 1 240); do
    if curl -s -o /dev/null "http://127.0.0.1:$proxy_port/"; then ready=1; break; fi
    sleep 0.5
done
[ -n "$ready" ] || { echo "the proxy did not start; its log:" >&2; cat "$out/proxy.log" >&2; exit 1; }

load() {
    taskset -c 1 wrk -t1 -c8 -d"$1" -s "$repo/load-tests/rotate_keys.lua" \
        "http://127.0.0.1:$proxy_port$path" -- "$work/keys-valid.txt"
}
load 3s >/dev/null
callgrind_control -z "$proxy" >/dev/null
requests=$(load 10s | sed -n 's/^WRKJSON .*"requests": *\([0-9]*\).*/\1/p')
callgrind_control -d "$proxy" >/dev/null
instructions=$(callgrind_annotate "$out/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "scenario $scenario: $requests requests, $instructions instructions, $((instructions / requests)) per request"
if [ -n "${PROFILE:-}" ]; then
    cp "$out/callgrind.out.1" "$PROFILE"
    echo "profile of the counted load: $PROFILE (callgrind_annotate --inclusive=yes $PROFILE)"
fi
