# Shared by scripts/test and scripts/run-local: find or start PostgreSQL and Redis.
# Sourced, not run. Needs: bash, and either the Debian packages or root to install them.

PG_BIN=""

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages when a command is missing (root only); otherwise says
# what to install and stops.
ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v pg_isready >/dev/null 2>&1 || missing+=(postgresql-client)
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust from https://rustup.rs"
  if [ ${#missing[@]} -gt 0 ]; then
    can_apt_install || die "missing packages: ${missing[*]} (as root: apt-get install ${missing[*]})"
    apt_install "${missing[@]}"
  fi
  ensure_build_packages
  PG_BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
}

can_apt_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# What building the crate needs beyond Rust: OpenSSL's headers and pkg-config,
# for webauthn-rs (passkeys) through openssl-sys. Installed as root when missing;
# otherwise says what to install and stops.
ensure_build_packages() {
  local missing=()
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; } \
    || [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  [ ${#missing[@]} -eq 0 ] && return 0
  can_apt_install || die "missing packages: ${missing[*]} (as root: apt-get install ${missing[*]})"
  apt_install "${missing[@]}"
}

# apt_install PKG…: installs Debian packages (root), refreshing the lists once if
# the first try fails.
apt_install() {
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; } \
    || die "apt-get install $* failed"
}

# Headless Chromium and its WebDriver for the browser test (tests/api/browser.rs).
# Installed as root; elsewhere that test says SKIPPED.
ensure_browser() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || [ -x /usr/lib/chromium/chromium ] || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || [ -x /usr/lib/chromium/chromedriver ] || missing+=(chromium-driver)
  [ ${#missing[@]} -eq 0 ] && return 0
  if can_apt_install; then
    apt_install "${missing[@]}"
  else
    log "warning: ${missing[*]} not installed (as root: apt-get install ${missing[*]}); the browser test will be skipped"
  fi
}

pg_up() { pg_isready -q -h "$1" -p "$2" -t 1 >/dev/null 2>&1; }
redis_up() { redis-cli -h "$1" -p "$2" ping 2>/dev/null | grep -q PONG; }

# run_as_pg_owner CMD…: PostgreSQL refuses to run as root, so root runs it as `postgres`.
run_as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# start_private_pg DATADIR PORT SUPERUSER [PASSWORD]: a cluster of our own, listening
# on 127.0.0.1:PORT only. With a password, TCP logins need it (scram); without, trust.
start_private_pg() {
  local dir=$1 port=$2 user=$3 password=${4:-}
  if pg_up 127.0.0.1 "$port"; then return 0; fi
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir"; chmod 700 "$dir"; fi
  if [ ! -f "$dir/PG_VERSION" ]; then
    log "initdb $dir"
    local auth=(--auth-local=trust --auth-host=trust)
    local pwfile=""
    if [ -n "$password" ]; then
      pwfile=$(mktemp); printf '%s\n' "$password" > "$pwfile"
      [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
      auth=(--auth-local=trust --auth-host=scram-sha-256 "--pwfile=$pwfile")
    fi
    run_as_pg_owner "$PG_BIN/initdb" -D "$dir" -U "$user" -E UTF8 "${auth[@]}" >/dev/null \
      || die "initdb failed for $dir"
    [ -n "$pwfile" ] && rm -f "$pwfile"
  fi
  log "starting PostgreSQL on 127.0.0.1:$port ($dir)"
  run_as_pg_owner "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >/dev/null \
    || die "PostgreSQL did not start; see $dir/server.log"
}

# start_private_redis DIR PORT: a Redis of our own on 127.0.0.1:PORT, nothing on disk.
start_private_redis() {
  local dir=$1 port=$2
  if redis_up 127.0.0.1 "$port"; then return 0; fi
  mkdir -p "$dir"
  log "starting Redis on 127.0.0.1:$port"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >/dev/null \
    || die "Redis did not start; see $dir/redis.log"
  for _ in $(seq 1 50); do redis_up 127.0.0.1 "$port" && return 0; sleep 0.1; done
  die "Redis did not answer on port $port"
}
