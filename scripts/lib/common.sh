# shellcheck shell=bash
# Helpers shared by the service scripts in scripts/ (sourced, not run).
#
# The sourcing script sets PROG (its name, the prefix of every message) before calling
# log or die, and STATE (its absolute state dir) before calling as_root-based installers.

log() { echo "${PROG:-scripts}: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Root runs apt-get directly; anyone else needs passwordless sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# apt_install PACKAGE SERVICE NEEDED: installs Debian's PACKAGE (output in $STATE/apt.log),
# then stops the system service SERVICE the package may start: the scripts run instances of
# their own and never use it, and it would hold memory and a port. Without apt-get it dies
# saying NEEDED ("Redis >= 7").
apt_install() {
  local package=$1 service=$2 needed=$3
  command -v apt-get >/dev/null || die "$package is missing and apt-get is not available; install $needed"
  log "installing Debian's $package package (output in $STATE/apt.log)..."
  if ! { as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"; } \
    >"$STATE/apt.log" 2>&1; then
    tail -n 30 "$STATE/apt.log" >&2
    die "apt-get install $package failed (log above)"
  fi
  # Where there is no init system to ask, there is nothing to stop.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$service" ]; then
    as_root "/etc/init.d/$service" stop >/dev/null 2>&1 || true
  fi
}

# A port nobody is bound to and not among the arguments (ports already handed out but not
# yet bound). Drawn below the kernel's ephemeral range so that outgoing connections cannot
# take it between a crash and the restart on the same port.
free_port() {
  local low port i taken files=(/proc/net/tcp)
  [ -r /proc/net/tcp6 ] && files+=(/proc/net/tcp6)
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] || low=32768
  for i in $(seq 1 200); do
    port=$((10000 + (RANDOM * 32768 + RANDOM) % (low - 10000)))
    for taken in "$@"; do
      [ "$port" != "$taken" ] || continue 2
    done
    # Any TCP socket (IPv4 or IPv6, any state) with this local port? /proc needs no tools.
    if ! awk -v p="$(printf ':%04X' "$port")" 'FNR > 1 && substr($2, length($2) - 4) == p { f = 1 }
        END { exit !f }' "${files[@]}"; then
      echo "$port"
      return
    fi
  done
  die "no free port found after $i tries"
}

# True while PID runs. A zombie counts as gone: once setsid'd, a server's parent is PID 1,
# which in a container may reap late or never.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# wait_gone PID TENTHS: true once PID is gone, false if it still runs after TENTHS/10 s.
wait_gone() {
  local pid=$1 tenths=$2
  while alive "$pid" && [ "$tenths" -gt 0 ]; do
    sleep 0.1
    tenths=$((tenths - 1))
  done
  ! alive "$pid"
}

# Quotes one word for POSIX sh (for commands that callers run with `sh -c`).
shq() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}
