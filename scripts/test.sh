#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests, then the
# container image's build (the Dockerfile's builder command) run as the container runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-postgres

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked

cargo build --release --locked --bin keygate
KEYGATE_RELEASE_BIN="$PWD/target/release/keygate" \
  cargo test --locked --test packaging -- --ignored the_image_build_runs_the_container_node
