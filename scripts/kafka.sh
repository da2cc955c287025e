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
set -euo pipefail

readonly START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}
readonly STOP_TIMEOUT=20
# Small heap: tests move little data and CI machines have 2 cores.
readonly HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly POM=$SCRIPT_DIR/kafka/pom.xml

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  echo "usage: $0 start|stop|restart STATE_DIR" >&2
  exit 2
}

java_bin() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then
    echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null; then
    command -v java
  else
    die "java not found (Kafka 4 needs Java 17+)"
  fi
}

kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n 1
}

# Sets LIBS to a directory holding the broker's jars, running Maven only when the cache
# is missing or was made from another pom.xml.
ensure_jars() {
  local version root want tmp
  version=$(kafka_version)
  [ -n "$version" ] || die "no <kafka.version> in $POM"
  root=${STREAM_RS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stream-rs}/kafka-$version
  LIBS=$root/libs
  want=$(sha256sum "$POM" | cut -d' ' -f1)
  if [ "$(cat "$root/complete" 2>/dev/null)" = "$want" ] &&
    [ -f "$LIBS/kafka_2.13-$version.jar" ]; then
    return
  fi
  mkdir -p "$root"
  # Parallel test runs on one machine: one fetches, the others wait and reuse.
  exec 9>"$root/lock"
  flock 9
  if [ "$(cat "$root/complete" 2>/dev/null)" != "$want" ] ||
    [ ! -f "$LIBS/kafka_2.13-$version.jar" ]; then
    command -v mvn >/dev/null || die "mvn not found; it is needed once to fetch Kafka $version"
    log "fetching Apache Kafka $version jars from Maven Central into $LIBS (first run only)..."
    tmp=$root/libs.tmp.$$
    rm -rf "$tmp"
    if ! mvn -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$root/mvn.log" 2>&1; then
      tail -n 40 "$root/mvn.log" >&2
      rm -rf "$tmp"
      die "mvn dependency:copy-dependencies failed (log above: $root/mvn.log)"
    fi
    ls "$tmp"/kafka_2.13-"$version".jar >/dev/null || die "kafka_2.13-$version.jar missing after mvn"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    # Written last: its presence means libs/ is complete.
    echo "$want" >"$root/complete"
  fi
  flock -u 9
  exec 9>&-
}

# Ports nobody is bound to. Drawn below the kernel's ephemeral range so that outgoing
# connections cannot take them between a crash and the restart on the same ports.
free_port() {
  local low port i files=(/proc/net/tcp)
  [ -r /proc/net/tcp6 ] && files+=(/proc/net/tcp6)
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] || low=32768
  for i in $(seq 1 200); do
    port=$((10000 + (RANDOM * 32768 + RANDOM) % (low - 10000)))
    [ "$port" != "${1:-}" ] || continue
    # Any TCP socket (IPv4 or IPv6, any state) with this local port? /proc needs no tools.
    if ! awk -v p="$(printf ':%04X' "$port")" 'FNR > 1 && substr($2, length($2) - 4) == p { f = 1 }
        END { exit !f }' "${files[@]}"; then
      echo "$port"
      return
    fi
  done
  die "no free port found after $i tries"
}

# True while PID runs. A zombie counts as gone: once setsid'd, the broker's parent is PID 1,
# which in a container may reap late or never.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# PID from STATE_DIR/pid if that process is still our broker (guards against pid reuse).
live_pid() {
  local pid
  pid=$(cat "$STATE/pid" 2>/dev/null) || return 1
  if [ -z "$pid" ] || ! alive "$pid"; then return 1; fi
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  echo "$pid"
}

wait_gone() {
  local pid=$1 tenths=$2
  while alive "$pid" && [ "$tenths" -gt 0 ]; do
    sleep 0.1
    tenths=$((tenths - 1))
  done
  ! alive "$pid"
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
  # Broker output goes to stdout, which the script appends to kafka.log; INFO is plenty.
  cat >"$STATE/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
  # The CLI tools used for the readiness probe: warnings only, to stderr.
  cat >"$STATE/tools-log4j2.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = ERR
EOF
}

# Runs a Kafka CLI class from the cached jars, e.g. `run_tool kafka.tools.StorageTool ...`,
# bounded so that a wedged tool cannot hang the test run.
run_tool() {
  timeout 60 "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dlog4j2.configurationFile="$STATE/tools-log4j2.properties" \
    -cp "$LIBS/*" "$@"
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

# Runs the broker in its own session (so the caller's Ctrl-C or process-group kill does not
# hit it, and a caller capturing our stdout does not wait for it), then waits until it
# answers a metadata request.
launch() {
  local port offset pid deadline
  port=$(cat "$STATE/port")
  echo "--- $(date '+%F %T') kafka.sh launching on port $port ---" >>"$STATE/kafka.log"
  offset=$(wc -c <"$STATE/kafka.log")
  rm -f "$STATE/pid"
  # shellcheck disable=SC2086  # HEAP_OPTS is a list of JVM flags
  # shellcheck disable=SC2016  # $$ and $0 belong to the inner sh
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$STATE/pid" \
    "$JAVA" $HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$STATE/log4j2.properties" -Dkafka.logs.dir="$STATE" \
    -cp "$LIBS/*" kafka.Kafka "$STATE/server.properties" \
    </dev/null >>"$STATE/kafka.log" 2>&1 &
  deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    pid=$(cat "$STATE/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && ! alive "$pid"; then
      tail -n 40 "$STATE/kafka.log" >&2
      die "the broker exited during startup (log above: $STATE/kafka.log)"
    fi
    # Cheap check first (no JVM), then a real metadata round trip through the listener.
    if tail -c +"$((offset + 1))" "$STATE/kafka.log" | grep -q 'Kafka Server started' &&
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
  if live_pid >/dev/null; then
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
  local pid
  pid=$(live_pid) || { rm -f "$STATE/pid"; return 0; }
  # SIGTERM = controlled shutdown (flushes logs); escalate if it hangs.
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" $((STOP_TIMEOUT * 10)); then
    log "broker $pid ignored SIGTERM for ${STOP_TIMEOUT}s; killing"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || true
  fi
  rm -f "$STATE/pid"
  log "stopped"
}

cmd_restart() {
  local pid port
  if [ ! -s "$STATE/port" ] || [ ! -s "$STATE/data/meta.properties" ]; then
    die "$STATE has no formatted broker; run start first"
  fi
  port=$(cat "$STATE/port")
  if pid=$(live_pid); then
    # A crash, not a shutdown: no controlled shutdown, no final flush.
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 100 || die "broker $pid survived SIGKILL"
  fi
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
