# shellcheck shell=bash
# The local broker's authenticated listener, sourced by lib/stack.sh.
#
#   PLAINTEXT  127.0.0.1:$KAFKA_PORT             the stack's own tooling and tests (no auth)
#   CONTROLLER 127.0.0.1:$KAFKA_CONTROLLER_PORT  KRaft
#   SASL_SSL   127.0.0.1:$KAFKA_SASL_PORT        what users connect to: TLS + SCRAM-SHA-512
#
# TLS: a CA generated here ($RUN_DIR/kafka/tls/ca.crt, what clients verify
# the broker with; its key ca.key is mode 600) signs the broker's
# certificate for 127.0.0.1 and localhost (PEM keystore broker.pem).
# SCRAM users: admin (super user), relay and notifier; each password is
# generated once into $RUN_DIR/kafka-<user>-password (mode 600) and never
# passed on a command line (ConfigCommand reads it from a mode-600 file).
# ACLs are enforced (StandardAuthorizer): relay and notifier may do only
# what kafka_security_apply grants them.
#
# kafka_config appends kafka_security_config to server.properties;
# kafka_start calls kafka_tls_init before the broker starts and
# kafka_security_apply once it is healthy (users and ACLs, idempotent, also
# on a data directory formatted before any of this existed).

KAFKA_SASL_MECHANISM=SCRAM-SHA-512
KAFKA_SCRAM_USERS=(admin relay notifier)
# Kafka transactional ids of the relay: outbox-relay.<slot>.
KAFKA_RELAY_TXN_PREFIX=outbox-relay.
# The group id of the relay's exactly-once reader (relay/src/dedupe.rs): it
# only assigns partitions, but librdkafka looks up the group's coordinator.
KAFKA_RELAY_DEDUPE_GROUP=outbox-relay-dedupe

kafka_tls_dir() { echo "$RUN_DIR/kafka/tls"; }

# The password of SCRAM user $1, generated on first use.
kafka_password_file() { echo "$RUN_DIR/kafka-$1-password"; }
kafka_password() {
    local f; f=$(kafka_password_file "$1")
    [ -s "$f" ] || (umask 077; mkdir -p "$RUN_DIR"; openssl rand -hex 24 >"$f")
    cat "$f"
}

# CA and broker certificate, made once per run directory.
kafka_tls_init() {
    local dir; dir=$(kafka_tls_dir)
    [ -s "$dir/broker.pem" ] && [ -s "$dir/ca.crt" ] && return 0
    mkdir -p "$dir"
    chmod 700 "$dir"
    log "generating a CA and the broker's TLS certificate in $dir"
    {
        tls_ca_and_cert "$dir" broker "outbox-relay local Kafka CA" &&
            # Kafka's PEM keystore: the (unencrypted PKCS#8) key, then the chain.
            (umask 077 && cat "$dir/broker.key" "$dir/broker.crt" "$dir/ca.crt" >"$dir/broker.pem.tmp") &&
            mv "$dir/broker.pem.tmp" "$dir/broker.pem"
    } >"$RUN_DIR/kafka/tls.log" 2>&1 || { cat "$RUN_DIR/kafka/tls.log" >&2; die "generating Kafka's TLS certificates failed"; }
    # Clients need to read the CA certificate (not its key).
    chmod 711 "$dir"
}

# server.properties lines for the SASL_SSL listener and the authorizer
# (the listener itself is in kafka_config's listeners lines).
kafka_security_config() {
    local tls; tls=$(kafka_tls_dir)
    cat <<CONF
# --- SASL_SSL listener (SCRAM-SHA-512 over TLS), ACLs enforced ---
sasl.enabled.mechanisms=$KAFKA_SASL_MECHANISM
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$tls/broker.pem
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
# Super users: ANONYMOUS is whoever connects to the PLAINTEXT loopback
# listener and the controller listener (the stack's own tooling, the tests,
# the broker and controller themselves) -- they stay unauthenticated, bound
# to 127.0.0.1; admin is the SCRAM administrator on SASL_SSL. relay and
# notifier get ACLs (kafka_security_apply).
super.users=User:ANONYMOUS;User:admin
CONF
}

# A Kafka command-line tool (main class $1) with the broker's class path,
# tuned for a short-lived JVM.
kafka_tool() {
    java -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dlog4j2.configurationFile="$ROOT/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*" "$@"
}

# Tool runs are started in the background and awaited together by
# kafka_security_apply: each is a JVM start (about 3 s), most of its cost.
KAFKA_TOOL_JOBS=()

# kafka_tool_job NAME MAIN ARGS...: runs a tool against the PLAINTEXT
# listener in the background, its output (secrets redacted) in security.log.
kafka_tool_job() {
    local name=$1; shift
    (
        local out user status=0
        out=$(kafka_tool "$@" --bootstrap-server "127.0.0.1:$KAFKA_PORT" 2>&1) || status=$?
        for user in "${KAFKA_SCRAM_USERS[@]}"; do
            [ -s "$(kafka_password_file "$user")" ] && out=${out//$(cat "$(kafka_password_file "$user")")/<redacted>}
        done
        (umask 077; printf '== %s\n%s\n' "$name" "$out" >>"$RUN_DIR/kafka/security.log")
        [ $status = 0 ] || { printf '%s\n' "$out" | tail -n 5 >&2; die "$name failed (log: $RUN_DIR/kafka/security.log)"; }
    ) &
    KAFKA_TOOL_JOBS+=($!)
}

kafka_tool_wait() {
    local pid failed=0
    for pid in "${KAFKA_TOOL_JOBS[@]}"; do wait "$pid" || failed=1; done
    KAFKA_TOOL_JOBS=()
    [ $failed = 0 ] || die "setting up Kafka's users and ACLs failed"
}

# kafka_scram_user USER: creates (or resets to the same password) SCRAM
# user USER; the password goes to the tool in a mode-600 file, not argv.
kafka_scram_user() {
    local user=$1 file
    kafka_password "$user" >/dev/null
    file="$RUN_DIR/kafka/scram-$user.properties"
    (umask 077; printf '%s=password=%s\n' "$KAFKA_SASL_MECHANISM" "$(kafka_password "$user")" >"$file")
    kafka_tool_job "SCRAM user $user" kafka.admin.ConfigCommand --alter --entity-type users \
        --entity-name "$user" --add-config-file "$file"
}

# kafka_acl ARGS...: adds ACLs (AclCommand --add: adding one that exists
# changes nothing).
kafka_acl() {
    kafka_tool_job "ACL $*" org.apache.kafka.tools.AclCommand --add --force "$@"
}

# The ACLs of the stack's services on topic $OUTBOX_TOPIC (and its dead-letter topic).
kafka_service_acls() {
    local topic=$OUTBOX_TOPIC
    # relay: produce to the outbox topic, read its ends back (exactly-once
    # restart, as group outbox-relay-dedupe), and its transactional ids
    # outbox-relay.<slot> (--kafka-transactions).
    kafka_acl --allow-principal User:relay --topic "$topic" --operation Write --operation Read
    kafka_acl --allow-principal User:relay --group "$KAFKA_RELAY_DEDUPE_GROUP" --operation Describe
    kafka_acl --allow-principal User:relay --transactional-id "$KAFKA_RELAY_TXN_PREFIX" \
        --resource-pattern-type prefixed --operation Write
    # notifier: consume the outbox topic in its group; write (and create) <topic>.dlq.
    kafka_acl --allow-principal User:notifier --topic "$topic" --group "${NOTIFIER_GROUP:-notifier}" --operation Read
    kafka_acl --allow-principal User:notifier --topic "$topic.dlq" --operation Write --operation Create
}

# The test stack's ACLs: the tests make unique topic and group names that
# start with $KAFKA_TEST_ACL_PREFIX; others stay forbidden to relay and
# notifier (what the tests of authorization failures use).
kafka_test_acls() {
    local p=${KAFKA_TEST_ACL_PREFIX:-sec_}
    kafka_acl --allow-principal User:relay --topic "$p" --resource-pattern-type prefixed \
        --operation Write --operation Read
    kafka_acl --allow-principal User:relay --group "$KAFKA_RELAY_DEDUPE_GROUP" --operation Describe
    kafka_acl --allow-principal User:relay --transactional-id "$KAFKA_RELAY_TXN_PREFIX$p" \
        --resource-pattern-type prefixed --operation Write
    kafka_acl --allow-principal User:notifier --topic "$p" --group "$p" --resource-pattern-type prefixed \
        --operation Read
    kafka_acl --allow-principal User:notifier --topic "$p" --resource-pattern-type prefixed \
        --operation Write --operation Create
}

# The broker's cluster id (from its formatted data directory).
kafka_cluster_id() { sed -n 's/^cluster.id=//p' "$RUN_DIR/kafka/data/meta.properties" 2>/dev/null; }

# Once the broker is healthy: creates the SCRAM users and adds the ACLs
# (also on a data directory formatted before any of this existed). Done once:
# $RUN_DIR/kafka/security.applied records a digest of the cluster id, the
# passwords, the ACL function and its variables, and a later start with the
# same ones does nothing (each tool run is a JVM start of a few seconds).
# ACLs are only added, never removed: after a change of $OUTBOX_TOPIC the
# old topic's stay (kafka-acls --remove them by hand).
# $1: the function adding the ACLs (default kafka_service_acls).
kafka_security_apply() {
    local acls=${1:-kafka_service_acls} stamp="$RUN_DIR/kafka/security.applied" want user
    for user in "${KAFKA_SCRAM_USERS[@]}"; do
        kafka_password "$user" >/dev/null
    done
    want=$({
        kafka_cluster_id
        for user in "${KAFKA_SCRAM_USERS[@]}"; do echo "$user $(kafka_password "$user")"; done
        declare -f "$acls"
        echo "${OUTBOX_TOPIC:-} ${NOTIFIER_GROUP:-} ${KAFKA_TEST_ACL_PREFIX:-}"
    } | sha256sum | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
    log "Kafka: SCRAM users ${KAFKA_SCRAM_USERS[*]} and their ACLs"
    for user in "${KAFKA_SCRAM_USERS[@]}"; do
        kafka_scram_user "$user"
    done
    "$acls"
    kafka_tool_wait
    rm -f "$RUN_DIR"/kafka/scram-*.properties
    echo "$want" >"$stamp"
}

# The SASL_SSL listener's address, for clients.
kafka_sasl_bootstrap() { echo "127.0.0.1:$KAFKA_SASL_PORT"; }

# kafka_client_properties USER: writes (mode 600) and prints the path of
# the librdkafka properties file with which the relay or the notifier logs
# in as USER over SASL_SSL, verifying the broker with the stack's CA.
kafka_client_properties() {
    local user=$1 f="$RUN_DIR/kafka-$1.properties"
    (
        umask 077
        printf '%s\n' "# $user on the stack's SASL_SSL listener (scripts/lib/kafka-security.sh)" \
            security.protocol=SASL_SSL \
            "sasl.mechanism=$KAFKA_SASL_MECHANISM" \
            "sasl.username=$user" \
            "sasl.password=$(kafka_password "$user")" \
            "ssl.ca.location=$(kafka_tls_dir)/ca.crt" >"$f.tmp"
        mv "$f.tmp" "$f"
    )
    echo "$f"
}

# kafka_client_args USER: the options (one per line) that log the relay or
# the notifier in as USER: a --kafka-properties-file, so the password is not
# in the process list.
kafka_client_args() {
    printf '%s\n' --kafka-properties-file "$(kafka_client_properties "$1")"
}
