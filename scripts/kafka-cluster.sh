#!/usr/bin/env bash
# Throwaway three-node Apache Kafka cluster (KRaft) on loopback, for the cluster tests
# (BRIEF.md section 6, issue 6).
#
#   scripts/kafka-cluster.sh start          STATE_DIR    fetch the broker jars if not cached,
#                        format three nodes with one cluster id, start them, wait until all
#                        three brokers serve a replication-factor-3 topic with a full ISR;
#                        last stdout line: 127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
#   scripts/kafka-cluster.sh stop           STATE_DIR    SIGTERM all, SIGKILL after 20s;
#                        idempotent, never fails
#   scripts/kafka-cluster.sh restart-broker STATE_DIR N  kill -9 (a crash) node N (1..3) and
#                        start it again on the same ports and log dirs (no re-format); wait
#                        until it is back in the ISR of every partition; prints the list again
#
# Each node is one JVM with process.roles=broker,controller, and the three form a static
# three-voter controller quorum (controller.quorum.voters): three JVMs rather than the four or
# six of separate roles, and killing any one node leaves both a broker majority (ISR 2 >=
# min.insync.replicas) and a controller majority (2 of 3 voters), so acks=all producers keep
# going while one node is down, even when the killed node was the active controller.
# Replication: default.replication.factor=3 and min.insync.replicas=2, internal topics too.
#
# STATE_DIR holds cluster-id, the readiness probe's log (probe.log), and nodeN/ per node with
# server.properties, log4j2.properties, port, controller-port, pid, kafka.log (all broker
# output) and data/ (the log dir). The jars are shared with scripts/kafka.sh (lib/kafka-common.sh).
# The readiness probe topic is stream-rs-cluster-probe (3 partitions, replication factor 3).
# Progress goes to stderr so that callers can capture the address list from stdout.
# Tunables: KAFKA_CLUSTER_START_TIMEOUT (seconds, default 150, per wait),
# KAFKA_CLUSTER_HEAP_OPTS (per node, default "-Xms192m -Xmx384m"), JAVA_HOME.
# Needs Java 17+, and mvn on the first run only.
set -euo pipefail

readonly START_TIMEOUT=${KAFKA_CLUSTER_START_TIMEOUT:-150}
readonly STOP_TIMEOUT=20
# Small heaps: three JVMs, tests move little data and CI machines have 2 cores.
readonly HEAP_OPTS=${KAFKA_CLUSTER_HEAP_OPTS:--Xms192m -Xmx384m}
readonly NODES=3
readonly PROBE_TOPIC=stream-rs-cluster-probe
readonly PROG=kafka-cluster.sh

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/kafka-common.sh
. "$SCRIPT_DIR/lib/kafka-common.sh"

usage() {
  echo "usage: $0 start|stop STATE_DIR | $0 restart-broker STATE_DIR N (N in 1..$NODES)" >&2
  exit 2
}

node_dir() { echo "$STATE/node$1"; }
node_port() { cat "$STATE/node$1/port"; }

bootstrap() {
  local n list=
  for n in $(seq 1 "$NODES"); do
    list+=${list:+,}127.0.0.1:$(node_port "$n")
  done
  echo "$list"
}

# write_config N VOTERS: node N's server.properties; VOTERS is the controller.quorum.voters list.
write_config() {
  local n=$1 voters=$2 dir port cport
  dir=$(node_dir "$n")
  port=$(cat "$dir/port")
  cport=$(cat "$dir/controller-port")
  cat >"$dir/server.properties" <<EOC
# Written by scripts/kafka-cluster.sh: node $n of a three-node KRaft test cluster on loopback.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data

# Three replicas everywhere; acks=all needs two of them in sync, so one node may be down.
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
unclean.leader.election.enable=false
# Fewer internal partitions than the default 50: the first group/transaction is faster.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

num.partitions=1
auto.create.topics.enable=true
# Tests should not wait for the 3 s join delay nor be forced to 6 s+ session timeouts.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000

# After a kill -9 the controller still holds the dead broker's registration and refuses the
# new one until that session expires (default 9 s); a shorter session makes restarts fast,
# and also fences the dead broker (moving leadership, shrinking ISRs) within 3 s.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500

# Few threads: CI machines have 2 cores, shared by three nodes.
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
background.threads=4
EOC
  write_log4j_configs "$dir"
}

format_storage() {
  local cluster_id n pids=() failed=()
  cluster_id=$(run_tool kafka.tools.StorageTool random-uuid)
  echo "$cluster_id" >"$STATE/cluster-id"
  log "formatting $NODES nodes (cluster id $cluster_id)..."
  # In parallel: each format is a JVM start of a second or two.
  for n in $(seq 1 "$NODES"); do
    run_tool kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$(node_dir "$n")/server.properties" >>"$(node_dir "$n")/kafka.log" 2>&1 &
    pids+=("$!")
  done
  for n in $(seq 1 "$NODES"); do
    wait "${pids[n - 1]}" || failed+=("$n")
  done
  for n in "${failed[@]}"; do
    tail -n 20 "$(node_dir "$n")/kafka.log" >&2
    die "kafka-storage format of node $n failed (log above)"
  done
}

# Prints why the cluster is not (yet) fully replicated: partitions without a leader or with
# an ISR smaller than the replica set, in any topic, and a missing or partial probe topic.
# Prints nothing when every partition is fully in sync.
replication_problems() {
  local out
  if ! out=$(run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(bootstrap)" \
    --describe 2>&1); then
    echo "describe failed: $(printf '%s\n' "$out" | tail -n 3)"
    return
  fi
  printf '%s\n' "$out" | awk -F'\t' -v probe="$PROBE_TOPIC" -v rf="$NODES" '
    $0 ~ /\tPartition: / {
      topic = leader = rep = isr = ""
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^Topic: /) topic = substr($i, 8)
        else if ($i ~ /^Leader: /) leader = substr($i, 9)
        else if ($i ~ /^Replicas: /) rep = substr($i, 11)
        else if ($i ~ /^Isr: /) isr = substr($i, 6)
      }
      nrep = split(rep, a, ","); nisr = split(isr, b, ",")
      if (leader == "none" || leader == "-1" || leader == "" || nisr < nrep)
        print "not in sync: " $0
      if (topic == probe) { probe_parts++; if (nrep != rf) print "probe has " nrep " replicas: " $0 }
    }
    END { if (probe_parts < rf) print "probe topic " probe " has " probe_parts + 0 " partitions" }'
}

# wait_ready N:OFFSET...: waits until each node named logged "Kafka Server started" after
# OFFSET in its kafka.log, the probe topic exists, and every partition of every topic has its
# full ISR. Dies (with log tails) if any node exits or on timeout.
wait_ready() {
  local deadline item n off pid started problems="nodes not started yet"
  deadline=$((SECONDS + START_TIMEOUT))
  while true; do
    for n in $(seq 1 "$NODES"); do
      pid=$(cat "$(node_dir "$n")/pid" 2>/dev/null || true)
      if [ -n "$pid" ] && ! alive "$pid"; then
        tail -n 40 "$(node_dir "$n")/kafka.log" >&2
        die "node $n exited (log above: $(node_dir "$n")/kafka.log)"
      fi
    done
    started=1
    for item in "$@"; do
      n=${item%%:*}
      off=${item#*:}
      # Not `tail | grep -q`: under pipefail, tail dies of SIGPIPE once grep has matched
      # and quit with more than a pipe buffer of log still to write, failing the check.
      grep -q 'Kafka Server started' < <(tail -c +"$((off + 1))" "$(node_dir "$n")/kafka.log") ||
        started=
    done
    if [ -n "$started" ]; then
      # Creating a replication-factor-3 topic fails until all three brokers are registered.
      if [ ! -f "$STATE/probe-created" ] &&
        run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(bootstrap)" \
          --create --if-not-exists --topic "$PROBE_TOPIC" --partitions "$NODES" \
          --replication-factor "$NODES" >>"$STATE/probe.log" 2>&1; then
        touch "$STATE/probe-created"
      fi
      if [ -f "$STATE/probe-created" ]; then
        problems=$(replication_problems)
        [ -n "$problems" ] || return 0
      else
        problems="cannot create $PROBE_TOPIC yet: $(tail -n 2 "$STATE/probe.log")"
      fi
    fi
    [ "$SECONDS" -lt "$deadline" ] || break
    sleep 0.5
  done
  printf '%s\n' "$problems" >&2
  for n in $(seq 1 "$NODES"); do
    echo "--- tail of $(node_dir "$n")/kafka.log" >&2
    tail -n 15 "$(node_dir "$n")/kafka.log" >&2
  done
  die "the cluster is not ready after ${START_TIMEOUT}s (state above)"
}

# launch N: starts node N (see spawn_broker) and prints N:OFFSET for wait_ready.
launch() {
  local n=$1 dir offset
  dir=$(node_dir "$n")
  echo "--- $(date '+%F %T') kafka-cluster.sh launching node $n on port $(node_port "$n") ---" \
    >>"$dir/kafka.log"
  offset=$(wc -c <"$dir/kafka.log")
  spawn_broker "$dir" "$HEAP_OPTS"
  echo "$n:$offset"
}

formatted() {
  local n
  [ -f "$STATE/formatted" ] || return 1
  for n in $(seq 1 "$NODES"); do
    [ -s "$(node_dir "$n")/data/meta.properties" ] && [ -s "$(node_dir "$n")/port" ] || return 1
  done
}

stop_all() {
  local n pid
  # SIGTERM to all at once (controlled shutdowns in parallel), then wait for each.
  for n in $(seq 1 "$NODES"); do
    if pid=$(broker_pid "$(node_dir "$n")"); then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for n in $(seq 1 "$NODES"); do
    stop_broker "$(node_dir "$n")" "$STOP_TIMEOUT"
  done
}

cmd_start() {
  local n dir taken=() port cport voters='' launched=()
  JAVA=$(java_bin)
  ensure_jars
  write_log4j_configs "$STATE"
  if formatted; then
    # Formatted by an earlier run of this STATE_DIR: keep its ports and data, no re-format.
    for n in $(seq 1 "$NODES"); do
      if broker_pid "$(node_dir "$n")" >/dev/null; then continue; fi
      log "starting node $n on 127.0.0.1:$(node_port "$n")..."
      launched+=("$(launch "$n")")
    done
  else
    stop_all
    rm -f "$STATE/formatted" "$STATE/probe-created" "$STATE/probe.log"
    for n in $(seq 1 "$NODES"); do
      dir=$(node_dir "$n")
      rm -rf "$dir"
      mkdir -p "$dir"
      port=$(free_port "${taken[@]}")
      cport=$(free_port "${taken[@]}" "$port")
      taken+=("$port" "$cport")
      echo "$port" >"$dir/port"
      echo "$cport" >"$dir/controller-port"
      voters+=${voters:+,}$n@127.0.0.1:$cport
    done
    for n in $(seq 1 "$NODES"); do
      write_config "$n" "$voters"
    done
    format_storage
    touch "$STATE/formatted"
    log "starting Kafka $(kafka_version) on $(bootstrap) (controllers $voters, state in $STATE)..."
    for n in $(seq 1 "$NODES"); do
      launched+=("$(launch "$n")")
    done
  fi
  wait_ready "${launched[@]}"
  log "cluster ready"
  bootstrap
}

cmd_stop() {
  local n any=
  for n in $(seq 1 "$NODES"); do
    if broker_pid "$(node_dir "$n")" >/dev/null; then any=1; fi
  done
  stop_all
  if [ -n "$any" ]; then log "stopped"; fi
}

cmd_restart_broker() {
  local n=$1 launched
  formatted || die "$STATE has no formatted cluster; run start first"
  # A crash, not a shutdown: no controlled shutdown, no final flush.
  crash_broker "$(node_dir "$n")"
  JAVA=$(java_bin)
  ensure_jars
  log "restarting node $n on 127.0.0.1:$(node_port "$n")..."
  launched=$(launch "$n")
  wait_ready "$launched"
  log "node $n is back in sync"
  bootstrap
}

[ $# -ge 2 ] || usage
mkdir -p "$2"
STATE=$(cd "$2" && pwd)
readonly STATE

case $1 in
  start) [ $# -eq 2 ] || usage; cmd_start ;;
  stop) [ $# -eq 2 ] || usage; cmd_stop ;;
  restart-broker)
    [ $# -eq 3 ] || usage
    case $3 in [1-9]) [ "$3" -le "$NODES" ] || usage ;; *) usage ;; esac
    cmd_restart_broker "$3"
    ;;
  *) usage ;;
esac
