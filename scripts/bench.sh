#!/usr/bin/env bash
# The benchmark command: starts redis-server and Kafka on loopback (as scripts/test.sh does),
# runs the release build of the benchmark program against them, and stops them.
#
#   scripts/bench.sh [--quick] [--only memory,redis,kafka]     results: stdout table and
#                                                              target/bench/results.json
# Services that are already set through STREAM_TEST_REDIS_URL / STREAM_TEST_KAFKA_BROKERS
# are reused instead of started.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly SCRIPTS=$ROOT/scripts

say() { echo "bench.sh: $*" >&2; }

STATE=$(mktemp -d "${TMPDIR:-/tmp}/stream-bench.XXXXXX")
readonly STATE
started=()

# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for service in "${started[@]}"; do
    "$SCRIPTS/$service.sh" stop "$STATE/$service" >/dev/null 2>&1 || true
  done
  rm -rf "$STATE"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${STREAM_TEST_REDIS_URL:-}" ]; then
  say "starting redis-server..."
  STREAM_TEST_REDIS_URL=$("$SCRIPTS/redis.sh" start "$STATE/redis" | tail -n 1)
  started+=(redis)
  export STREAM_TEST_REDIS_URL
fi
if [ -z "${STREAM_TEST_KAFKA_BROKERS:-}" ]; then
  say "starting Kafka..."
  STREAM_TEST_KAFKA_BROKERS=$("$SCRIPTS/kafka.sh" start "$STATE/kafka" | tail -n 1)
  started+=(kafka)
  export STREAM_TEST_KAFKA_BROKERS
fi

cd "$ROOT"
cargo build --release -p stream-examples --bin bench
mkdir -p target/bench
say "redis at $STREAM_TEST_REDIS_URL, kafka at $STREAM_TEST_KAFKA_BROKERS"
target/release/bench --json target/bench/results.json "$@"
