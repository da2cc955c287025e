#!/usr/bin/env bash
# Throwaway single-node Apache Kafka (KRaft, broker+controller in one JVM) on loopback,
# for the test suite (BRIEF.md section 6).
#
#   scripts/kafka.sh start   STATE_DIR   fetch the broker jars if not cached, format, start;
#                                        last stdout line is 127.0.0.1:PORT (bootstrap servers)
#   scripts/kafka.sh stop    STATE_DIR   SIGTERM, SIGKILL after 20s; idempotent, never fails
#   scripts/kafka.sh restart STATE_DIR   kill -9 (a crash) and start again on the same ports
#                                        and log dirs (no re-format); prints the address again
#
# The jars come from Maven Central through scripts/kafka/pom.xml and are cached outside the
# clone, in ${XDG_CACHE_HOME:-~/.cache}/stream-rs/kafka-VERSION/libs (override the root with
# STREAM_RS_CACHE_DIR); a second run does not run Maven.
# STATE_DIR holds server.properties, log4j2.properties, port, controller-port, pid, kafka.log
# (all broker output) and data/ (the log dirs).
# Progress goes to stderr so that callers can capture the address from stdout.
# Tunables: KAFKA_START_TIMEOUT (seconds, default 90), KAFKA_HEAP_OPTS (default
# "-Xms256m -Xmx512m"), JAVA_HOME. Needs Java 17+, and mvn on the first run only.
# Three-node cluster: scripts/kafka-cluster.sh. Shared helpers: scripts/lib/.
set -euo pipefail

readonly START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}
readonly STOP_TIMEOUT=20
# Small heap: tests move little data and CI machines have 2 cores.
readonly HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}

readonly PROG=kafka.sh

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/kafka-common.sh
. "$SCRIPT_DIR/lib/kafka-common.sh"

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

write_config() {
  local port=$1 cport=$2
  cat >"$STATE/server.properties" <<EOF
# Written by scripts/kafka.sh: single-node KRaft test broker on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$STATE/data

# One broker: every internal topic must make do with one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the default 50: the first group/transaction is faster.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

num.partitions=1
auto.create.topics.enable=true
# Tests should not wait for the 3 s join delay nor be forced to 6 s+ session timeouts.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000

# After a kill -9 the controller still holds the dead broker's registration and refuses the
# new one until that session expires (default 9 s); a shorter session makes restarts fast.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500

# Few threads: CI machines have 2 cores.
num.network.threads=2
num.io.threads=2
EOF
  write_log4j_configs "$STATE"
}

format_storage() {
  local cluster_id
  cluster_id=$(run_tool kafka.tools.StorageTool random-uuid)
  echo "$cluster_id" >"$STATE/cluster-id"
  log "formatting $STATE/data (cluster id $cluster_id)..."
  run_tool kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$STATE/server.properties" >>"$STATE/kafka.log" 2>&1 ||
    { tail -n 20 "$STATE/kafka.log" >&2; die "kafka-storage format failed (log above)"; }
}

# Runs the broker in its own session (see spawn_broker), then waits until it answers a
# metadata request.
launch() {
  local port offset pid deadline
  port=$(cat "$STATE/port")
  echo "--- $(date '+%F %T') kafka.sh launching on port $port ---" >>"$STATE/kafka.log"
  offset=$(wc -c <"$STATE/kafka.log")
  spawn_broker "$STATE" "$HEAP_OPTS"
  deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    pid=$(cat "$STATE/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && ! alive "$pid"; then
      tail -n 40 "$STATE/kafka.log" >&2
      die "the broker exited during startup (log above: $STATE/kafka.log)"
    fi
    # Cheap check first (no JVM), then a real metadata round trip through the listener.
    # Not `tail | grep -q`: under pipefail, tail dies of SIGPIPE once grep has matched and
    # quit with more than a pipe buffer of log still to write, failing the check.
    if grep -q 'Kafka Server started' < <(tail -c +"$((offset + 1))" "$STATE/kafka.log") &&
      run_tool org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "127.0.0.1:$port" --list >/dev/null 2>&1; then
      return
    fi
    sleep 0.5
  done
  tail -n 40 "$STATE/kafka.log" >&2
  die "the broker did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s (log above)"
}

cmd_start() {
  local port cport
  JAVA=$(java_bin)
  ensure_jars
  if broker_pid "$STATE" >/dev/null; then
    port=$(cat "$STATE/port")
    log "already running on port $port"
  else
    if [ -s "$STATE/data/meta.properties" ] && [ -s "$STATE/port" ]; then
      # Formatted by an earlier run of this STATE_DIR: keep its ports, do not re-format.
      port=$(cat "$STATE/port")
      log "starting the existing broker in $STATE on 127.0.0.1:$port..."
    else
      rm -rf "$STATE/data"
      port=$(free_port)
      cport=$(free_port "$port")
      echo "$port" >"$STATE/port"
      echo "$cport" >"$STATE/controller-port"
      write_config "$port" "$cport"
      format_storage
      log "starting Kafka $(kafka_version) on 127.0.0.1:$port (controller on $cport, state in $STATE)..."
    fi
    launch
  fi
  echo "127.0.0.1:$port"
}

cmd_stop() {
  broker_pid "$STATE" >/dev/null || { rm -f "$STATE/pid"; return 0; }
  # SIGTERM = controlled shutdown (flushes logs); escalate if it hangs.
  stop_broker "$STATE" "$STOP_TIMEOUT"
  log "stopped"
}

cmd_restart() {
  local port
  if [ ! -s "$STATE/port" ] || [ ! -s "$STATE/data/meta.properties" ]; then
    die "$STATE has no formatted broker; run start first"
  fi
  port=$(cat "$STATE/port")
  # A crash, not a shutdown: no controlled shutdown, no final flush.
  crash_broker "$STATE"
  JAVA=$(java_bin)
  ensure_jars
  log "restarting the broker on 127.0.0.1:$port..."
  launch
  echo "127.0.0.1:$port"
}

[ $# -eq 2 ] || usage
mkdir -p "$2"
STATE=$(cd "$2" && pwd)
readonly STATE

case $1 in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_restart ;;
  *) usage ;;
esac
