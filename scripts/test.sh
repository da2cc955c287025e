#!/usr/bin/env bash
# The project's one test command: starts real brokers on loopback, runs every test against
# them, stops what it started (BRIEF.md section 6).
#
#   scripts/test.sh [extra cargo test args...]     e.g. scripts/test.sh -- --nocapture
#
# Stage 1: single-node Redis and Kafka, `cargo test --workspace --all-features ARGS` with
# `--skip cluster` added for the test binaries.
# Stage 2 (the cluster stage): stops the single-node services, starts a three-master Redis
# Cluster (scripts/redis-cluster.sh) and a three-node Kafka cluster (scripts/kafka-cluster.sh),
# then runs only the tests whose names contain `cluster`:
# `cargo test --workspace --all-features -- cluster` (the extra args are not passed on).
# The exit status is stage 1's if it failed, else stage 2's.
#
# Stage 1 exports for the tests:
#   STREAM_TEST_REDIS_URL       redis://127.0.0.1:PORT
#   STREAM_TEST_REDIS_RESTART   shell command (run it with `sh -c`) that kill -9s redis and
#                               starts it again on the same port and data
#   STREAM_TEST_KAFKA_BROKERS   127.0.0.1:PORT
#   STREAM_TEST_KAFKA_RESTART   shell command that kill -9s the broker and starts it again on
#                               the same ports and log dirs
#   STREAM_TEST_POSTGRES_URL    postgres://postgres@127.0.0.1:PORT/postgres (trust auth)
#   STREAM_TEST_POSTGRES_RESTART  shell command that kill -9s PostgreSQL and starts it again
#                               on the same port and data
# Restarts hit the one shared broker, so tests that use them disturb concurrent tests.
#
# Stage 2 exports instead (the variables above are unset there):
#   STREAM_TEST_REDIS_CLUSTER_URLS      redis://127.0.0.1:P1,redis://127.0.0.1:P2,redis://...:P3
#                                       (the three masters, no replicas; 16384 slots split)
#   STREAM_TEST_REDIS_CLUSTER_RESTART   shell command prefix, ending in a space: append a node
#                                       number N (1..3, the position in the URL list) and run it
#                                       with `sh -c`; kill -9s that node and starts it again on
#                                       the same port, nodes.conf and AOF, returning once
#                                       cluster_state is ok again
#   STREAM_TEST_KAFKA_CLUSTER_BROKERS   127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3 (broker N has
#                                       node.id N; replication factor 3, min.insync.replicas 2)
#   STREAM_TEST_KAFKA_CLUSTER_RESTART   the same for Kafka: append a broker number N (1..3);
#                                       kill -9s it and starts it again on the same ports and log
#                                       dirs, returning once it is back in every partition's ISR
#
# STREAM_TEST_SKIP_KAFKA=1 skips Kafka for quick local runs (the Kafka suites then report
# themselves skipped; in stage 2 only the Redis Cluster is started). CI never sets it, and
# under CI=true it is refused.
# STREAM_TEST_CLUSTERS=0 leaves stage 2 out of a quick local run (it takes a few minutes
# more, and the three Kafka JVMs about 1.1 GB of memory); refused under CI=true.
# STREAM_TEST_KEEP_STATE=1 keeps the brokers' state dir (logs, data) after the run.
# The first run installs redis-server (apt) and fetches Kafka (Maven); later runs reuse them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly SCRIPTS=$ROOT/scripts

say() { echo "test.sh: $*" >&2; }

# Quotes one word for POSIX sh (the restart commands are run with `sh -c`).
shq() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

if [ "${STREAM_TEST_SKIP_KAFKA:-}" = 1 ] && [ "${CI:-}" = true ]; then
  say "STREAM_TEST_SKIP_KAFKA=1 is not allowed under CI=true"
  exit 2
fi
if [ "${STREAM_TEST_CLUSTERS:-}" = 0 ] && [ "${CI:-}" = true ]; then
  say "STREAM_TEST_CLUSTERS=0 is not allowed under CI=true"
  exit 2
fi

STATE=$(mktemp -d "${TMPDIR:-/tmp}/stream-test.XXXXXX")
readonly STATE

# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  say "stopping services..."
  "$SCRIPTS/kafka.sh" stop "$STATE/kafka" >/dev/null 2>&1 || true
  "$SCRIPTS/redis.sh" stop "$STATE/redis" >/dev/null 2>&1 || true
  "$SCRIPTS/postgres.sh" stop "$STATE/postgres" >/dev/null 2>&1 || true
  "$SCRIPTS/kafka-cluster.sh" stop "$STATE/kafka-cluster" >/dev/null 2>&1 || true
  "$SCRIPTS/redis-cluster.sh" stop "$STATE/redis-cluster" >/dev/null 2>&1 || true
  if [ "${STREAM_TEST_KEEP_STATE:-}" = 1 ]; then
    say "state kept in $STATE"
  else
    rm -rf "$STATE"
  fi
  exit "$status"
}
trap cleanup EXIT
# Ctrl-C or a CI cancel: exit, which runs cleanup.
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting redis-server..."
redis_url=$("$SCRIPTS/redis.sh" start "$STATE/redis" | tail -n 1)
say "redis ready at $redis_url"
export STREAM_TEST_REDIS_URL=$redis_url
STREAM_TEST_REDIS_RESTART="$(shq "$SCRIPTS/redis.sh") restart $(shq "$STATE/redis")"
export STREAM_TEST_REDIS_RESTART

say "starting PostgreSQL..."
postgres_url=$("$SCRIPTS/postgres.sh" start "$STATE/postgres" | tail -n 1)
say "postgres ready at $postgres_url"
export STREAM_TEST_POSTGRES_URL=$postgres_url
STREAM_TEST_POSTGRES_RESTART="$(shq "$SCRIPTS/postgres.sh") restart $(shq "$STATE/postgres")"
export STREAM_TEST_POSTGRES_RESTART

if [ "${STREAM_TEST_SKIP_KAFKA:-}" = 1 ]; then
  say "STREAM_TEST_SKIP_KAFKA=1: not starting Kafka; Kafka suites will be skipped"
  unset STREAM_TEST_KAFKA_BROKERS STREAM_TEST_KAFKA_RESTART
else
  say "starting Kafka (the first run fetches it from Maven Central)..."
  kafka_brokers=$("$SCRIPTS/kafka.sh" start "$STATE/kafka" | tail -n 1)
  say "kafka ready at $kafka_brokers"
  export STREAM_TEST_KAFKA_BROKERS=$kafka_brokers
  STREAM_TEST_KAFKA_RESTART="$(shq "$SCRIPTS/kafka.sh") restart $(shq "$STATE/kafka")"
  export STREAM_TEST_KAFKA_RESTART
fi

# Tests whose names contain `cluster` need the clusters of stage 2; stage 1 leaves them out
# (under CI=true they would fail for want of their services, as they should).
args=("$@")
has_separator=false
for arg in "${args[@]}"; do
  if [ "$arg" = -- ]; then has_separator=true; fi
done
if [ "$has_separator" = true ]; then
  args+=(--skip cluster)
else
  args+=(-- --skip cluster)
fi
say "running cargo test --workspace --all-features ${args[*]}"
cd "$ROOT"
status=0
cargo test --workspace --all-features "${args[@]}" || status=$?
say "cargo test exited with status $status"

if [ "${STREAM_TEST_CLUSTERS:-}" = 0 ]; then
  say "STREAM_TEST_CLUSTERS=0: skipping the cluster stage"
  exit "$status"
fi

# Stage 2. The single-node services go first: the Kafka cluster needs the memory.
say "cluster stage: stopping the single-node services..."
"$SCRIPTS/kafka.sh" stop "$STATE/kafka" >/dev/null 2>&1 || true
"$SCRIPTS/redis.sh" stop "$STATE/redis" >/dev/null 2>&1 || true
"$SCRIPTS/postgres.sh" stop "$STATE/postgres" >/dev/null 2>&1 || true
unset STREAM_TEST_REDIS_URL STREAM_TEST_REDIS_RESTART STREAM_TEST_KAFKA_BROKERS \
  STREAM_TEST_KAFKA_RESTART STREAM_TEST_POSTGRES_URL STREAM_TEST_POSTGRES_RESTART

say "starting a three-master Redis Cluster..."
redis_cluster_urls=$("$SCRIPTS/redis-cluster.sh" start "$STATE/redis-cluster" | tail -n 1)
say "redis cluster ready at $redis_cluster_urls"
export STREAM_TEST_REDIS_CLUSTER_URLS=$redis_cluster_urls
STREAM_TEST_REDIS_CLUSTER_RESTART="$(shq "$SCRIPTS/redis-cluster.sh") restart-node $(shq "$STATE/redis-cluster") "
export STREAM_TEST_REDIS_CLUSTER_RESTART

if [ "${STREAM_TEST_SKIP_KAFKA:-}" = 1 ]; then
  say "STREAM_TEST_SKIP_KAFKA=1: not starting the Kafka cluster; its suites will be skipped"
  unset STREAM_TEST_KAFKA_CLUSTER_BROKERS STREAM_TEST_KAFKA_CLUSTER_RESTART
else
  say "starting a three-node Kafka cluster..."
  kafka_cluster_brokers=$("$SCRIPTS/kafka-cluster.sh" start "$STATE/kafka-cluster" | tail -n 1)
  say "kafka cluster ready at $kafka_cluster_brokers"
  export STREAM_TEST_KAFKA_CLUSTER_BROKERS=$kafka_cluster_brokers
  STREAM_TEST_KAFKA_CLUSTER_RESTART="$(shq "$SCRIPTS/kafka-cluster.sh") restart-broker $(shq "$STATE/kafka-cluster") "
  export STREAM_TEST_KAFKA_CLUSTER_RESTART
fi

say "cluster stage: running cargo test --workspace --all-features -- cluster"
cluster_status=0
cargo test --workspace --all-features -- cluster || cluster_status=$?
say "cluster stage: cargo test exited with status $cluster_status"
if [ "$status" -eq 0 ]; then status=$cluster_status; fi
exit "$status"
