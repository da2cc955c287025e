#!/usr/bin/env bash
# The project's one test command: starts real brokers on loopback, runs every test against
# them, stops what it started (BRIEF.md section 6).
#
#   scripts/test.sh [extra cargo test args...]     e.g. scripts/test.sh -- --nocapture
#
# It exports for the tests:
#   STREAM_TEST_REDIS_URL       redis://127.0.0.1:PORT
#   STREAM_TEST_REDIS_RESTART   shell command (run it with `sh -c`) that kill -9s redis and
#                               starts it again on the same port and data
#   STREAM_TEST_KAFKA_BROKERS   127.0.0.1:PORT
#   STREAM_TEST_KAFKA_RESTART   shell command that kill -9s the broker and starts it again on
#                               the same ports and log dirs
# Restarts hit the one shared broker, so tests that use them disturb concurrent tests.
#
# STREAM_TEST_SKIP_KAFKA=1 skips Kafka for quick local runs (the Kafka suites then report
# themselves skipped). CI never sets it, and under CI=true it is refused.
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

STATE=$(mktemp -d "${TMPDIR:-/tmp}/stream-test.XXXXXX")
readonly STATE

# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  say "stopping services..."
  "$SCRIPTS/kafka.sh" stop "$STATE/kafka" >/dev/null 2>&1 || true
  "$SCRIPTS/redis.sh" stop "$STATE/redis" >/dev/null 2>&1 || true
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

say "running cargo test --workspace --all-features $*"
cd "$ROOT"
status=0
cargo test --workspace --all-features "$@" || status=$?
say "cargo test exited with status $status"
exit "$status"
