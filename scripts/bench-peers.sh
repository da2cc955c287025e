#!/usr/bin/env bash
# The peers benchmark: shove and ruststream on the same Redis and Kafka as scripts/bench.sh.
# Starts redis-server and Kafka on loopback (as scripts/bench.sh does), builds the standalone
# crate benches/peers in release (its own Cargo.lock and target directory: the library does not
# depend on its peers), runs it against them, and stops what it started.
#
#   scripts/bench-peers.sh [--quick] [--full] [--runs R] [--sizes 64,1024]
#                          [--only redis,kafka] [--peers shove,ruststream]
#                          [--redis-messages N] [--kafka-publish-messages N]
#                          [--kafka-consume-messages N]
#
# Results: the stdout table and benches/peers/target/results.json (override with PEERS_JSON).
# Services that are already set through STREAM_TEST_REDIS_URL / STREAM_TEST_KAFKA_BROKERS are
# reused instead of started; REDIS_PERSISTENCE=none starts Redis without the AOF, as for
# scripts/bench.sh runs that measure CPU rather than the disk.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly SCRIPTS=$ROOT/scripts
readonly PEERS=$ROOT/benches/peers

say() { echo "bench-peers.sh: $*" >&2; }

STATE=$(mktemp -d "${TMPDIR:-/tmp}/stream-bench-peers.XXXXXX")
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

# Built first: a clean build compiles librdkafka and takes minutes, which the services need not
# sit through.
say "building benches/peers (release)..."
(cd "$PEERS" && cargo build --release --locked)

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

json=${PEERS_JSON:-$PEERS/target/results.json}
say "redis at $STREAM_TEST_REDIS_URL, kafka at $STREAM_TEST_KAFKA_BROKERS"
"$PEERS/target/release/peers" --json "$json" "$@"
