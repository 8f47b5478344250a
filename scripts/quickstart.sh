#!/usr/bin/env bash
# Builds keygate, starts the demo upstream on 127.0.0.1:9000 and runs keygate on
# config/keygate.yaml (listening on 127.0.0.1:8080). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo build --release --locked --bin keygate --example demo_upstream
target/release/examples/demo_upstream 127.0.0.1:9000 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
target/release/keygate check-config -c config/keygate.yaml
target/release/keygate serve -c config/keygate.yaml
