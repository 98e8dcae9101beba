#!/usr/bin/env bash
# Runs every test: the workspace's unit and integration tests (real processes, real SQLite and
# PostgreSQL on loopback), then the docker-compose end-to-end check when a Docker engine answers.
# Usage: scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests run the workspace's binaries, msctl among them, which no test target of
# their own packages would build.
cargo build --workspace --bins

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    echo "cargo-nextest not found; running the tests with cargo test"
    cargo test --workspace --no-fail-fast "$@"
fi

if docker info >/dev/null 2>&1 &&
    { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }; then
    scripts/compose-test.sh
elif [ -n "${CI:-}" ]; then
    echo "FAIL: CI needs a Docker engine and Compose for scripts/compose-test.sh" >&2
    exit 1
else
    echo "SKIP: docker-compose end-to-end check (no reachable Docker engine, or no Compose)"
fi
