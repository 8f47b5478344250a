#!/usr/bin/env bash
# The quickstart: builds keygate, starts the demo upstream on 127.0.0.1:9000 and
# runs keygate standalone on config/keygate.yaml (gateway on 127.0.0.1:8080, admin
# API on 127.0.0.1:9090, SQLite in data/). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo build --release --locked --bin keygate --example demo_upstream

# The admin API needs a token; make one unless the caller brought their own.
if [ -z "${KEYGATE_ADMIN_TOKEN:-}" ]; then
  KEYGATE_ADMIN_TOKEN="kgadm_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  export KEYGATE_ADMIN_TOKEN
  cat <<MSG

  Admin token for this run (keygate keys ... reads it from the environment):

      export KEYGATE_ADMIN_TOKEN=$KEYGATE_ADMIN_TOKEN

MSG
fi

target/release/examples/demo_upstream 127.0.0.1:9000 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
target/release/keygate check-config -c config/keygate.yaml
target/release/keygate serve -c config/keygate.yaml
