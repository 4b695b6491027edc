#!/usr/bin/env bash
# scripts/lib/stack-selftest.sh — checks of the process helpers in stack.sh
# that scripts/up relies on, with throw-away processes (no stack needed):
# a zombie does not count as running, a service that exits right after its
# health check is not reported up, a running one is, and scripts/up's
# choice of broker. Run by scripts/test; exits non-zero on the first failure.
set -euo pipefail
source "$(dirname "$0")/stack.sh"
STACK_NAME=selftest
RUN_DIR=$(mktemp -d)
trap 'rm -rf "$RUN_DIR"' EXIT
fail() { printf '\033[31m[selftest] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# A zombie: `exec sleep` replaces the shell that started the child, so
# nobody reaps the child when it exits.
bash -c 'sleep 0.2 & echo $! >"$1/zombie"; exec sleep 5' _ "$RUN_DIR" &
holder=$!
sleep 1
zombie=$(cat "$RUN_DIR/zombie")
kill -0 "$zombie" 2>/dev/null || fail "the zombie vanished before the check (pid $zombie)"
mkdir -p "$RUN_DIR/pids"
echo "$zombie" >"$(pid_file ghost)"
echo "$holder" >"$(pid_file holder)"
! is_running ghost || fail "a zombie (pid $zombie) counts as running"
is_running holder || fail "a sleeping process (pid $holder) does not count as running"
kill "$holder"

# A service that passes its health check and exits a second later.
out=$( (start quitter sleep 1 && wait_healthy quitter 5 true && confirm_stayed_up 2) 2>&1) \
    && fail "a service that exited after its health check was reported up: $out"
grep -q "quitter exited right after it became healthy" <<<"$out" \
    || fail "no clear message for the service that exited: $out"

# One that stays up.
STARTED_HERE=()
start sleeper sleep 30
wait_healthy sleeper 5 true
confirm_stayed_up 1
is_running sleeper || fail "a running service is not reported running"
stop sleeper

# The broker: .run/env's own address is the local broker; anything else is external.
KAFKA_PORT=9092
for given in "" "127.0.0.1:9092" "localhost:9092"; do
    KAFKA_BOOTSTRAP_SERVERS=$given choose_kafka 2>/dev/null
    [ -z "${EXTERNAL_KAFKA:-}" ] || fail "KAFKA_BOOTSTRAP_SERVERS='$given' was taken for an external cluster"
done
KAFKA_BOOTSTRAP_SERVERS=kafka.example:9093 choose_kafka 2>/dev/null
[ "${EXTERNAL_KAFKA:-}" = 1 ] || fail "an external KAFKA_BOOTSTRAP_SERVERS was taken for the local broker"

log "stack helpers: ok"
