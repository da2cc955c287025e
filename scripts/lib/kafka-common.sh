# shellcheck shell=bash
# Kafka helpers shared by scripts/kafka.sh and scripts/kafka-cluster.sh (sourced, not run).
# Needs lib/common.sh. JAVA and LIBS are set by java_bin/ensure_jars; run_tool needs STATE.
#
# The jars come from Maven Central through scripts/kafka/pom.xml and are cached outside the
# clone, in ${XDG_CACHE_HOME:-~/.cache}/stream-rs/kafka-VERSION/libs (override the root with
# STREAM_RS_CACHE_DIR); a second run does not run Maven.

POM=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/kafka/pom.xml
readonly POM

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

# Writes DIR/log4j2.properties (broker output to stdout, which the scripts append to
# DIR/kafka.log; INFO is plenty) and DIR/tools-log4j2.properties (CLI tools: warnings only,
# to stderr).
write_log4j_configs() {
  local dir=$1
  cat >"$dir/log4j2.properties" <<'EOC'
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
EOC
  cat >"$dir/tools-log4j2.properties" <<'EOC'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = ERR
EOC
}

# Runs a Kafka CLI class from the cached jars, e.g. `run_tool kafka.tools.StorageTool ...`,
# bounded so that a wedged tool cannot hang the test run.
run_tool() {
  timeout 60 "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dlog4j2.configurationFile="$STATE/tools-log4j2.properties" \
    -cp "$LIBS/*" "$@"
}

# PID from DIR/pid if that process is still a broker (guards against pid reuse).
broker_pid() {
  local pid
  pid=$(cat "$1/pid" 2>/dev/null) || return 1
  if [ -z "$pid" ] || ! alive "$pid"; then return 1; fi
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  echo "$pid"
}

# Starts the broker of DIR (DIR/server.properties, DIR/log4j2.properties; output appended to
# DIR/kafka.log, pid in DIR/pid) in its own session, so that the caller's Ctrl-C or
# process-group kill does not hit it, and a caller capturing our stdout does not wait for
# it. Does not wait for it. spawn_broker DIR HEAP_OPTS
spawn_broker() {
  local dir=$1 heap=$2
  rm -f "$dir/pid"
  # shellcheck disable=SC2086  # heap is a list of JVM flags
  # shellcheck disable=SC2016  # $$ and $0 belong to the inner sh
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$dir/pid" \
    "$JAVA" $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" -Dkafka.logs.dir="$dir" \
    -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >>"$dir/kafka.log" 2>&1 &
}

# Stops the broker of DIR: SIGTERM (controlled shutdown, flushes logs), SIGKILL if it still
# runs after TIMEOUT seconds. Never fails. stop_broker DIR TIMEOUT
stop_broker() {
  local dir=$1 timeout=$2 pid
  pid=$(broker_pid "$dir") || { rm -f "$dir/pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" $((timeout * 10)); then
    log "broker $pid ignored SIGTERM for ${timeout}s; killing"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || true
  fi
  rm -f "$dir/pid"
}

# kill -9 (a crash: no controlled shutdown, no final flush) the broker of DIR.
crash_broker() {
  local dir=$1 pid
  if pid=$(broker_pid "$dir"); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 100 || die "broker $pid survived SIGKILL"
  fi
}
