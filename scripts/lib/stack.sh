# shellcheck shell=bash
# The local stack, shared by scripts/up, scripts/down and scripts/test.
#
# Each stack lives in its own run directory ($RUN_DIR) with its own ports, so
# the test stack (.run/test) never collides with the one scripts/up starts
# (.run). Every process started here writes its pid to $RUN_DIR/pids/NAME.pid
# and its log to $RUN_DIR/logs/NAME.log; scripts/down stops them by pid.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE_DIR=${OUTBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}
# The version is pinned in kafka/pom.xml; the jars are copied once into the cache.
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/kafka/pom.xml")
KAFKA_LIBS=$CACHE_DIR/kafka-$KAFKA_VERSION/libs
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SYS_PYTHON=/usr/bin/python3
PG_SUPERUSER=outbox

log() { printf '\033[1m[%s]\033[0m %s\n' "${STACK_NAME:-stack}" "$*" >&2; }
die() { printf '\033[31m[%s] error:\033[0m %s\n' "${STACK_NAME:-stack}" "$*" >&2; exit 1; }

# The broker's SASL_SSL listener: TLS certificates, SCRAM users, ACLs.
# shellcheck source=scripts/lib/kafka-security.sh
source "$ROOT/scripts/lib/kafka-security.sh"

# --- installation ----------------------------------------------------------

apt_install_missing() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing apt packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# What the stack and the build need: Postgres 15 server binaries, the SMTP
# sink, Prometheus, and what rdkafka's bundled librdkafka builds against.
ensure_packages() {
    local pkgs=(python3-aiosmtpd prometheus build-essential pkg-config cmake libssl-dev libsasl2-dev
                libzstd-dev zlib1g-dev openssl postgresql-client-15 fonts-dejavu-core)
    [ -x "$PG_BIN/postgres" ] || pkgs+=(postgresql-15)
    apt_install_missing "${pkgs[@]}"
    [ -x "$PG_BIN/postgres" ] || die "no PostgreSQL 15 server binaries in $PG_BIN"
    command -v cargo-nextest >/dev/null || {
        log "installing cargo-nextest"
        cargo install cargo-nextest --locked
    }
}

# Apache Kafka's jars (broker, tools, the log4j2 binding the POMs leave out),
# fetched once with Maven into the cache directory outside the clone and
# reused by every later run; a Java runtime to run them.
ensure_kafka() {
    fetch_jars "$ROOT/kafka/pom.xml" "$KAFKA_LIBS" "Apache Kafka $KAFKA_VERSION" kafka-fetch.log
}

# fetch_jars POM DEST WHAT LOG: a Java runtime, then (once) every runtime
# dependency of POM copied into DEST with Maven; DEST/.complete marks a
# finished copy, so an interrupted one is redone.
fetch_jars() {
    local pom=$1 dest=$2 what=$3 logfile=$CACHE_DIR/$4
    command -v java >/dev/null || apt_install_missing openjdk-17-jre-headless
    [ -f "$dest/.complete" ] && return 0
    command -v mvn >/dev/null || apt_install_missing maven
    log "fetching $what jars into $dest (first time only, about a minute)"
    local tmp=$dest.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$tmp" >"$logfile" 2>&1 \
        || { tail -n 30 "$logfile" >&2; die "fetching the $what jars failed (log: $logfile)"; }
    touch "$tmp/.complete"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

# Kafka Connect with Debezium's Postgres connector (the benchmark peer of
# `scripts/bench vs-debezium`, never used by the product), fetched the same
# way: versions pinned in kafka/connect/pom.xml.
DEBEZIUM_VERSION=$(sed -n 's:.*<debezium.version>\(.*\)</debezium.version>.*:\1:p' "$ROOT/kafka/connect/pom.xml")
DEBEZIUM_LIBS=$CACHE_DIR/connect-$KAFKA_VERSION-debezium-$DEBEZIUM_VERSION/libs
ensure_debezium() {
    fetch_jars "$ROOT/kafka/connect/pom.xml" "$DEBEZIUM_LIBS" \
        "Kafka Connect $KAFKA_VERSION and Debezium $DEBEZIUM_VERSION" debezium-fetch.log
}

# --- processes -------------------------------------------------------------

pid_file() { echo "$RUN_DIR/pids/$1.pid"; }

# choose_kafka: the stack's own broker, or the external cluster named by
# KAFKA_BOOTSTRAP_SERVERS (sets EXTERNAL_KAFKA), and says which. The own
# broker's address (what .run/env exports) is not an external cluster, even
# when a shell that sourced .run/env runs scripts/up again.
choose_kafka() {
    case "${KAFKA_BOOTSTRAP_SERVERS:-}" in
        ""|"127.0.0.1:$KAFKA_PORT"|"localhost:$KAFKA_PORT")
            EXTERNAL_KAFKA=
            KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
            log "Kafka: the stack's own broker on $KAFKA_BOOTSTRAP_SERVERS" ;;
        *)
            EXTERNAL_KAFKA=1
            log "Kafka: the external cluster at $KAFKA_BOOTSTRAP_SERVERS (KAFKA_BOOTSTRAP_SERVERS is set)" ;;
    esac
}

# alive PID: the process exists and is not a zombie (a killed process
# answers `kill -0` until its parent reaps it).
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ]
}

is_running() {
    local f; f=$(pid_file "$1")
    [ -f "$f" ] && alive "$(cat "$f")"
}

# Services this run started, and when the last of them became healthy
# (see confirm_stayed_up).
STARTED_HERE=()
LAST_HEALTHY_AT=0

# start NAME CMD...: runs CMD in the background (own process group) with its
# log under $RUN_DIR/logs, unless NAME is already running.
start() {
    local name=$1; shift
    if is_running "$name"; then
        log "$name already running (pid $(cat "$(pid_file "$name")"))"
        return 0
    fi
    mkdir -p "$RUN_DIR/pids" "$RUN_DIR/logs"
    log "starting $name"
    setsid "$@" >>"$RUN_DIR/logs/$name.log" 2>&1 < /dev/null &
    echo $! >"$(pid_file "$name")"
    STARTED_HERE+=("$name")
}

stop() {
    local name=$1 f pid
    f=$(pid_file "$name")
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

# wait_healthy NAME DEADLINE_SECONDS CHECK...: polls CHECK until it succeeds;
# on timeout names the service and prints the tail of its log.
wait_healthy() {
    local name=$1 deadline=$2; shift 2
    local end=$((SECONDS + deadline))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $end ]; then
            printf '\n--- last lines of %s ---\n' "$RUN_DIR/logs/$name.log" >&2
            tail -n 30 "$RUN_DIR/logs/$name.log" >&2 2>/dev/null || true
            die "$name did not become healthy within ${deadline}s"
        fi
        if [ -f "$(pid_file "$name")" ] && ! is_running "$name"; then
            printf '\n--- last lines of %s ---\n' "$RUN_DIR/logs/$name.log" >&2
            tail -n 30 "$RUN_DIR/logs/$name.log" >&2 2>/dev/null || true
            die "$name exited during start-up"
        fi
        sleep 0.2
    done
    LAST_HEALTHY_AT=$(date +%s%3N)
    log "$name healthy"
}

# confirm_stayed_up [SECONDS]: a service that answered its health check and
# exited right after (a refused login, say) is not up. Waits until SECONDS
# (whole, 2 by default) have passed since the last one became healthy, then
# fails naming any service started by this run that is no longer running.
confirm_stayed_up() {
    local settle=${1:-2} name wait
    [ ${#STARTED_HERE[@]} -gt 0 ] || return 0
    wait=$((LAST_HEALTHY_AT + settle * 1000 - $(date +%s%3N)))
    if [ "$wait" -gt 0 ]; then sleep "$((wait / 1000)).$(printf %03d $((wait % 1000)))"; fi
    for name in "${STARTED_HERE[@]}"; do
        if ! is_running "$name"; then
            printf '\n--- last lines of %s ---\n' "$RUN_DIR/logs/$name.log" >&2
            tail -n 30 "$RUN_DIR/logs/$name.log" >&2 2>/dev/null || true
            die "$name exited right after it became healthy"
        fi
    done
}

http_ok() { curl -fs -o /dev/null --max-time 2 "$1"; }

# --- Postgres --------------------------------------------------------------

# Postgres refuses to run as root: as root, the cluster belongs to the
# 'postgres' system user (created by Debian's packages, or here).
pg_os_user() {
    if [ "$(id -u)" -eq 0 ]; then echo postgres; else id -un; fi
}

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_password() { cat "$RUN_DIR/pg-password"; }

pg_url() { echo "postgres://$PG_SUPERUSER:$(pg_password)@127.0.0.1:$PG_PORT/${1:-outbox}"; }

pg_init() {
    local data=$RUN_DIR/pg
    [ -f "$data/PG_VERSION" ] && return 0
    mkdir -p "$RUN_DIR"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        # The postgres user must be able to reach $RUN_DIR: grant search (x,
        # not read) on each ancestor that lacks it.
        local d=$RUN_DIR
        while [ "$d" != / ]; do
            runuser -u postgres -- test -x "$d" 2>/dev/null || { log "granting o+x on $d so Postgres can reach its data"; chmod o+x "$d"; }
            d=$(dirname "$d")
        done
    fi
    [ -f "$RUN_DIR/pg-password" ] || (umask 077; openssl rand -hex 16 >"$RUN_DIR/pg-password")
    mkdir -p "$data"
    chmod 700 "$data"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$data"
    local pwfile; pwfile=$(mktemp)
    pg_password >"$pwfile"
    chmod 644 "$pwfile"
    log "initdb $data (port $PG_PORT, wal_level=logical)"
    as_pg "$PG_BIN/initdb" -D "$data" -U "$PG_SUPERUSER" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$RUN_DIR/initdb.log" 2>&1 \
        || { rm -f "$pwfile"; cat "$RUN_DIR/initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"
    as_pg tee -a "$data/postgresql.conf" >/dev/null <<CONF

# --- outbox-relay stack ---
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = logical
max_replication_slots = ${PG_MAX_SLOTS:-20}
max_wal_senders = ${PG_MAX_SLOTS:-20}
max_connections = ${PG_MAX_CONNECTIONS:-100}
wal_sender_timeout = '15s'
ssl = on
log_min_messages = warning
log_connections = off
${PG_EXTRA_CONF:-}
CONF
    {
        echo "# TYPE  DATABASE     USER  ADDRESS  METHOD"
        # Test stack only: one role per authentication method the relay supports.
        if [ "${PG_AUTH_TEST_ROLES:-0}" = 1 ]; then
            for m in trust password md5; do
                echo "host all relay_$m 127.0.0.1/32 $m"
                echo "host replication relay_$m 127.0.0.1/32 $m"
            done
        fi
        echo "host all all 127.0.0.1/32 scram-sha-256"
        echo "host replication all 127.0.0.1/32 scram-sha-256"
    } | as_pg tee "$data/pg_hba.conf" >/dev/null
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

pg_ca() { echo "$RUN_DIR/pg-tls/ca.crt"; }

# tls_ca_and_cert DIR NAME CA_CN: in DIR, a CA (ca.key, ca.crt; kept if
# there) and NAME.key/NAME.crt signed by it for a server on this machine
# (SAN 127.0.0.1 and localhost). Prints openssl's chatter; callers log it.
tls_ca_and_cert() {
    local dir=$1 name=$2 ca_cn=$3
    (
        cd "$dir"
        umask 077
        if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
            openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
                -subj "/CN=$ca_cn" -keyout ca.key -out ca.crt \
                -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        fi
        openssl req -new -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$name.key" -out "$name.csr"
        printf '%s\n' basicConstraints=CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
            extendedKeyUsage=serverAuth subjectAltName=IP:127.0.0.1,DNS:localhost >"$name.ext"
        openssl x509 -req -sha256 -days 3650 -in "$name.csr" -CA ca.crt -CAkey ca.key \
            -CAcreateserial -extfile "$name.ext" -out "$name.crt"
        rm -f "$name.csr" "$name.ext"
        chmod 644 ca.crt "$name.crt"
    )
}

# Postgres's TLS certificate, signed by a CA made once per run directory
# (SAN localhost and 127.0.0.1), so clients can use sslmode=verify-full with
# sslrootcert=$(pg_ca). A data directory from before the CA gets a new
# certificate too.
pg_tls_init() {
    local data=$RUN_DIR/pg dir=$RUN_DIR/pg-tls
    [ -s "$dir/ca.crt" ] && [ -s "$data/server.crt" ] && return 0
    mkdir -p "$dir"
    chmod 700 "$dir"
    log "generating a CA and Postgres's TLS certificate in $dir"
    tls_ca_and_cert "$dir" server "outbox-relay local Postgres CA" >"$RUN_DIR/pg-tls.log" 2>&1 || { cat "$RUN_DIR/pg-tls.log" >&2; die "generating Postgres's TLS certificates failed"; }
    # Clients need to read the CA certificate (not its key).
    chmod 711 "$dir"
    install -m 600 "$dir/server.key" "$data/server.key"
    install -m 644 "$dir/server.crt" "$data/server.crt"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$data/server.key" "$data/server.crt"
}

pg_start() {
    pg_init
    pg_tls_init
    if pg_ready; then
        log "postgres already running on port $PG_PORT"
        return 0
    fi
    mkdir -p "$RUN_DIR/logs"
    touch "$RUN_DIR/logs/postgres.log"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$RUN_DIR/logs/postgres.log"
    log "starting postgres"
    as_pg "$PG_BIN/pg_ctl" -D "$RUN_DIR/pg" -l "$RUN_DIR/logs/postgres.log" -w -t 60 start >/dev/null \
        || { tail -n 30 "$RUN_DIR/logs/postgres.log" >&2; die "postgres did not start"; }
    wait_healthy postgres 30 pg_ready
}

pg_stop() {
    [ -f "$RUN_DIR/pg/postmaster.pid" ] || return 0
    log "stopping postgres"
    as_pg "$PG_BIN/pg_ctl" -D "$RUN_DIR/pg" -m fast -w -t 60 stop >/dev/null || true
}

psql_admin() { PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 "$(pg_url "${PSQL_DB:-postgres}")" "$@"; }

# Creates database $1 (if missing) and applies the migrations to it.
pg_database() {
    local db=$1
    if [ -z "$(PSQL_DB=postgres psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
        PSQL_DB=postgres psql_admin -c "CREATE DATABASE $db"
    fi
    "$DEVSTACK" migrate --database-url "$(pg_url "$db")" | sed "s/^/[$STACK_NAME] $db: /" >&2
}

# --- Apache Kafka (KRaft, combined broker + controller, one node) ----------

kafka_ready() { "$DEVSTACK" metadata --bootstrap-servers "127.0.0.1:$KAFKA_PORT" --timeout 2s; }

# The broker's configuration: one node that is broker and controller, data
# under $RUN_DIR/kafka/data (kept across restarts), every internal topic at
# replication 1. Transactions work (the relay's --kafka-transactions).
# Listeners: PLAINTEXT (the stack's tooling and tests), CONTROLLER, and
# SASL_SSL on $KAFKA_SASL_PORT with ACLs (lib/kafka-security.sh).
kafka_config() {
    local dir=$RUN_DIR/kafka
    mkdir -p "$dir/data"
    cat >"$dir/server.properties" <<CONF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Records carry the time the broker stored them (loadgen's commit→Kafka).
log.message.timestamp.type=LogAppendTime
$(kafka_security_config)
${KAFKA_EXTRA_CONF:-}
CONF
}

# java with the broker's class path, heap and logging; the main class and
# its arguments follow.
kafka_java_cmd() {
    local gc
    read -r -a gc <<<"${KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20}"
    KAFKA_JAVA=(java -Xms"${KAFKA_HEAP:-512m}" -Xmx"${KAFKA_HEAP:-512m}" "${gc[@]}"
                -Djava.awt.headless=true -Dlog4j2.configurationFile="$ROOT/kafka/log4j2.properties"
                -cp "$KAFKA_LIBS/*")
}

kafka_start() {
    if [ -n "${EXTERNAL_KAFKA:-}" ]; then
        log "using the Kafka cluster at $KAFKA_BOOTSTRAP_SERVERS (no local broker)"
        return 0
    fi
    ensure_kafka
    kafka_tls_init
    kafka_config
    kafka_java_cmd
    local dir=$RUN_DIR/kafka
    if [ ! -f "$dir/data/meta.properties" ]; then
        log "formatting Kafka storage in $dir/data (KRaft, standalone controller)"
        # A cluster id: 16 random bytes, base64url without padding, never
        # starting with '-' (StorageTool would read it as an option; Kafka's
        # own generator skips those too).
        local id
        id=$("$SYS_PYTHON" -c '
import base64, os
while True:
    id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not id.startswith("-"):
        print(id)
        break')
        "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format --standalone -t "$id" -c "$dir/server.properties" \
            >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "formatting Kafka storage failed"; }
    fi
    start kafka "${KAFKA_JAVA[@]}" kafka.Kafka "$dir/server.properties"
    wait_healthy kafka 90 kafka_ready
    # SCRAM users and ACLs (once per data directory; KAFKA_ACLS names the
    # function granting them, default kafka_service_acls).
    kafka_security_apply "${KAFKA_ACLS:-kafka_service_acls}"
}

# --- SMTP sink -------------------------------------------------------------

smtp_ready() { "$SYS_PYTHON" -c "import smtplib; smtplib.SMTP('127.0.0.1', $SMTP_PORT, timeout=2).quit()"; }

smtp_start() {
    # aiosmtpd with a Maildir delivery of our own (scripts/lib/smtp-sink.py:
    # the bytes as sent, not parsed and rewritten as aiosmtpd's Mailbox
    # handler does), in SMTP_SINK_WORKERS processes (default: one a core, at
    # most 4) sharing the port, so the stack's mail server is not the stage
    # the notifier waits on.
    local workers=${SMTP_SINK_WORKERS:-$(nproc)}
    [[ $workers =~ ^[1-9][0-9]*$ ]] || die "SMTP_SINK_WORKERS must be a number of processes, not '$workers'"
    [ "$workers" -le 4 ] || workers=4
    start smtp "$SYS_PYTHON" "$ROOT/scripts/lib/smtp-sink.py" --listen "127.0.0.1:$SMTP_PORT" \
        --workers "$workers" "$RUN_DIR/smtp-maildir"
    wait_healthy smtp 20 smtp_ready
}

# --- teardown --------------------------------------------------------------

stack_down() {
    local f
    for f in "$RUN_DIR"/pids/*.pid; do
        [ -e "$f" ] || continue
        stop "$(basename "$f" .pid)"
    done
    pg_stop
}
