#!/usr/bin/env bash
# End-to-end check of docker-compose.yml as people use it, on a machine without an image registry:
# builds the release binaries and the local images (docker/build-images.sh), starts the compose
# file with docker/compose.local.yml under a throwaway project name on a free host port, waits for
# health, then checks from the host with curl: kv CRUD, the kv text protocol, a notice through SSE,
# a killed kv replica under traffic, and a distributor restart under traffic, all with
# authentication on (a token minted in the gateway's container), and checks that requests without
# a token from outside the compose network are refused. Prints PASS/FAIL per
# check and a summary line; always tears the project down; exits non-zero on any failure.
# Env: GATEWAY_PORT (host port, default: a free one), COMPOSE_TEST_TIMEOUT (whole run, seconds,
# default 1800), COMPOSE_TEST_KEEP=1 (leave the stack running for a look; `down` is printed).
set -euo pipefail
cd "$(dirname "$0")/.."

total_timeout=${COMPOSE_TEST_TIMEOUT:-1800}
started=$(date +%s)
project=mstest$(date +%s)$$
work=$(mktemp -d "${TMPDIR:-/tmp}/compose-test.XXXXXX")
passed=0
failed=0
background_pids=()

log() { echo "[$(($(date +%s) - started))s] $*" >&2; }
pass() {
    passed=$((passed + 1))
    echo "PASS $1"
}
fail() {
    failed=$((failed + 1))
    echo "FAIL $1${2:+: $2}"
}

for tool in docker curl timeout; do
    command -v "$tool" >/dev/null || { echo "compose-test: $tool is required" >&2; exit 1; }
done
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
else
    echo "compose-test: neither 'docker compose' nor docker-compose is installed" >&2
    exit 1
fi
timeout 30 docker info >/dev/null 2>&1 || { echo "compose-test: no Docker engine answers" >&2; exit 1; }

# A port nobody listens on now; the tiny race until compose binds it is acceptable for a test.
free_port() {
    if command -v python3 >/dev/null; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}
export GATEWAY_PORT=${GATEWAY_PORT:-$(free_port)}
gateway=http://127.0.0.1:$GATEWAY_PORT

compose() {
    timeout 300 "${compose_cmd[@]}" -p "$project" -f docker-compose.yml -f docker/compose.local.yml "$@"
}

# The teardown may run while a command's output is redirected: it reports to the original ones.
exec 8>&1 9>&2
stack_up=0
teardown() {
    local status=$?
    trap - EXIT INT TERM
    exec 1>&8 2>&9
    [ ${#background_pids[@]} -eq 0 ] || kill "${background_pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ "$stack_up" = 1 ]; then
        if [ "$failed" -gt 0 ] || [ "$status" -ne 0 ]; then
            echo "--- service logs (last 40 lines each) ---"
            compose logs --no-color --tail 40 2>&1 || true
        fi
        if [ "${COMPOSE_TEST_KEEP:-}" = 1 ]; then
            echo "left running: ${compose_cmd[*]} -p $project -f docker-compose.yml -f docker/compose.local.yml down -v"
        else
            log "tearing down project $project"
            compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || echo "compose-test: teardown of $project failed" >&2
        fi
    fi
    rm -rf "$work"
    if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed=1
        echo "FAIL compose-test aborted (exit $status)"
    fi
    echo "$passed passed, $failed failed ($(($(date +%s) - started)) s)"
    [ "$failed" -eq 0 ] || exit 1
    exit 0
}
trap teardown EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Bounds the whole run: the watchdog's TERM ends the script through the teardown above.
(
    sleep "$total_timeout" &
    sleep_pid=$!
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
    wait "$sleep_pid"
    echo "compose-test: the whole run exceeded ${total_timeout}s" >&2
    kill -TERM $$
    # The script runs its trap only once its current command ends: end that command too (its
    # `timeout` wrapper passes the signal on).
    pkill -TERM -P $$ || true
) &
background_pids+=($!)

# curl with bounds and no token; prints the HTTP status, the body goes to the file named by $1.
http_as_anyone() {
    local body_file=$1
    shift
    curl -s -o "$body_file" -w '%{http_code}' --connect-timeout 3 --max-time 10 "$@" || true
}

# Keeps trying a command until it succeeds or $1 seconds pass.
eventually() {
    local seconds=$1
    shift
    local deadline=$(($(date +%s) + seconds))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

log "building release binaries"
timeout 3600 cargo build --release -p distributor -p gateway -p kv-service -p notice-service
log "building images"
timeout 3600 docker/build-images.sh

log "starting project $project (gateway on host port $GATEWAY_PORT)"
stack_up=1
if compose up -d --no-build >"$work/up.log" 2>&1; then
    pass "compose up"
else
    cat "$work/up.log"
    fail "compose up" "see the output above"
    exit 1
fi

services=(postgres distributor gateway kv-1 kv-2 notice)
all_healthy() {
    local service cid health
    for service in "${services[@]}"; do
        cid=$(compose ps -q "$service" 2>/dev/null)
        [ -n "$cid" ] || return 1
        health=$(docker inspect -f '{{ if .State.Health }}{{ .State.Health.Status }}{{ end }}' "$cid" 2>/dev/null)
        [ "$health" = healthy ] || return 1
    done
}
if eventually 180 all_healthy; then
    pass "all services healthy"
else
    compose ps
    fail "all services healthy" "not within 180 s"
    exit 1
fi

# --- authentication: the stack runs with the secrets its one-shot service generated ---
token=$(timeout 30 "${compose_cmd[@]}" -p "$project" -f docker-compose.yml -f docker/compose.local.yml \
    exec -T gateway gateway mint-token --jwt-secret-file /secrets/jwt.secret \
    --sub compose-test --scope admin --ttl 1h 2>"$work/mint.err" | tr -d '\r\n' || true)
if [ "$(tr -cd '.' <<<"$token" | wc -c)" = 2 ]; then
    pass "a token minted with docker compose exec gateway gateway mint-token"
else
    fail "a token minted with docker compose exec gateway gateway mint-token" "$(cat "$work/mint.err")"
fi
# curl with the token: every request below is authenticated unless it says otherwise.
acurl() { curl -H "Authorization: Bearer $token" "$@"; }
# As http_as_anyone, with the token.
http() {
    http_as_anyone "$@" -H "Authorization: Bearer $token"
}
for path in /kv/hello /_/topology /notices; do
    status=$(http_as_anyone "$work/body" "$gateway$path")
    if [ "$status" = 401 ]; then
        pass "GET $path without a token from outside the compose network is refused (401)"
    else
        fail "GET $path without a token from outside the compose network is refused (401)" "status $status, body $(head -c 200 "$work/body")"
    fi
done
status=$(http_as_anyone "$work/body" "$gateway/kv/hello" -H "Authorization: Bearer ${token}x")
if [ "$status" = 401 ]; then
    pass "a tampered token is refused (401)"
else
    fail "a tampered token is refused (401)" "status $status"
fi

# True when every node given (host:port) is in the gateway's topology and connected.
topology_has() {
    local topology node
    topology=$(acurl -s --max-time 5 "$gateway/_/topology") || return 1
    for node in "$@"; do
        grep -o "{[^{}]*\"addr\":\"$node\"[^{}]*}" <<<"$topology" | grep -q '"connected":true' || return 1
    done
}
if eventually 60 topology_has kv-1:9010 kv-2:9010 notice:9020; then
    pass "gateway topology lists kv-1, kv-2 and notice, connected"
else
    fail "gateway topology lists kv-1, kv-2 and notice, connected" "$(acurl -s --max-time 5 "$gateway/_/topology")"
fi

status=$(http "$work/body" "$gateway/")
if [ "$status" = 200 ] && grep -qi '<html' "$work/body"; then
    pass "GET / serves the status page"
else
    fail "GET / serves the status page" "status $status, body $(head -c 200 "$work/body")"
fi

# --- kv CRUD through the gateway ---
status=$(http "$work/body" -X PUT "$gateway/kv/hello" -d world)
if [ "$status" = 200 ] && grep -q '"value":"world"' "$work/body"; then
    pass "PUT /kv/hello"
else
    fail "PUT /kv/hello" "status $status, body $(cat "$work/body")"
fi
# Several reads in a row go round-robin over both replicas: each sees the shared database.
reads_ok=1
for _ in 1 2 3 4 5 6; do
    status=$(http "$work/body" "$gateway/kv/hello")
    if [ "$status" != 200 ] || ! grep -q '"value":"world"' "$work/body"; then
        reads_ok=0
        break
    fi
done
if [ "$reads_ok" = 1 ]; then
    pass "GET /kv/hello (6 reads over both replicas)"
else
    fail "GET /kv/hello (6 reads over both replicas)" "status $status, body $(cat "$work/body")"
fi
status=$(http "$work/body" -X DELETE "$gateway/kv/hello")
status_after=$(http "$work/body2" "$gateway/kv/hello")
if [ "$status" = 200 ] && [ "$status_after" = 404 ]; then
    pass "DELETE /kv/hello, then GET is 404"
else
    fail "DELETE /kv/hello, then GET is 404" "DELETE $status $(cat "$work/body"), GET $status_after"
fi

# --- the text protocol (not published on the host; spoken from inside kv-1's container) ---
kv1=$(compose ps -q kv-1)
reply=$(timeout 15 docker exec -e TOKEN="$token" "$kv1" bash -c \
    'exec 3<>/dev/tcp/127.0.0.1/8395; printf "auth<%s>put<text-key,from nc>get<text-key>" "$TOKEN" >&3; timeout 2 cat <&3' | tr -d '\r\n' || true)
status=$(http "$work/body" "$gateway/kv/text-key")
if [ "$reply" = "ok<compose-test>ok<text-key>value<from nc>" ] && [ "$status" = 200 ] &&
    grep -q '"value":"from nc"' "$work/body"; then
    pass "text protocol put/get on kv-1, read back over HTTP"
else
    fail "text protocol put/get on kv-1, read back over HTTP" "reply '$reply', HTTP $status $(cat "$work/body")"
fi

# --- a notice through SSE ---
message="compose-test notice $RANDOM$RANDOM"
acurl -sN --max-time 30 -D "$work/sse.headers" -o "$work/sse.body" "$gateway/notices/stream" &
sse_pid=$!
background_pids+=("$sse_pid")
if eventually 15 grep -qs ' 200' "$work/sse.headers"; then
    status=$(http "$work/body" -X POST "$gateway/notices" -H 'content-type: application/json' \
        -d "{\"message\":\"$message\"}")
    if [ "$status" = 201 ] && eventually 15 grep -q "$message" "$work/sse.body"; then
        pass "notice POSTed arrives on the SSE stream"
    else
        fail "notice POSTed arrives on the SSE stream" "POST $status $(cat "$work/body"); stream: $(head -c 500 "$work/sse.body")"
    fi
else
    fail "notice POSTed arrives on the SSE stream" "the stream did not open: $(cat "$work/sse.headers" 2>/dev/null)"
fi
kill "$sse_pid" 2>/dev/null || true

# --- traffic while something breaks ---
# Writes distinct keys one after another until $work/stop-$1 exists; one line per request:
# "<status> <key>". Everything answered 200 must still be readable afterwards.
traffic() {
    local name=$1 i=0 status
    while [ ! -e "$work/stop-$name" ]; do
        i=$((i + 1))
        status=$(acurl -s -o /dev/null -w '%{http_code}' --connect-timeout 2 --max-time 6 \
            -X PUT "$gateway/kv/$name-$i" -d "value-$i" || true)
        echo "$status $name-$i" >>"$work/traffic-$name"
        sleep 0.05
    done
}

# Judges a traffic run: at most $2 failed requests, the last 20 all answered, every acknowledged
# write readable now.
judge_traffic() {
    local name=$1 allowed_errors=$2 check=$3
    local log_file=$work/traffic-$name
    local total errors tail_errors unreadable=0 key
    total=$(wc -l <"$log_file")
    errors=$(grep -vc '^200 ' "$log_file" || true)
    tail_errors=$(tail -n 20 "$log_file" | grep -vc '^200 ' || true)
    while read -r key; do
        acurl -s --max-time 5 "$gateway/kv/$key" | grep -q "\"value\":\"value-${key##*-}\"" ||
            unreadable=$((unreadable + 1))
    done < <(awk '$1 == 200 { print $2 }' "$log_file")
    local by_status detail
    by_status=$(awk '$1 != 200 { n[$1]++ } END { for (s in n) printf " %s x%d", s == "000" ? "no answer" : s, n[s] }' "$log_file")
    detail="$total requests, $errors failed${by_status:+ (${by_status# })}, $unreadable acknowledged writes unreadable"
    if [ "$total" -ge 40 ] && [ "$errors" -le "$allowed_errors" ] && [ "$tail_errors" -eq 0 ] && [ "$unreadable" -eq 0 ]; then
        pass "$check ($detail)"
    else
        fail "$check" "$detail"
    fi
}

run_under_traffic() {
    local name=$1
    shift
    traffic "$name" &
    local traffic_pid=$!
    background_pids+=("$traffic_pid")
    sleep 3
    "$@" >"$work/action-$name.log" 2>&1 || log "$* failed: $(cat "$work/action-$name.log")"
    sleep 8
    touch "$work/stop-$name"
    wait "$traffic_pid" || true
}

log "killing kv-1 under traffic"
run_under_traffic kill compose kill kv-1
judge_traffic kill 5 "requests keep succeeding after docker-compose kill kv-1"
if eventually 30 topology_has kv-2:9010 && ! topology_has kv-1:9010; then
    pass "topology drops kv-1 and keeps kv-2"
else
    fail "topology drops kv-1 and keeps kv-2" "$(acurl -s --max-time 5 "$gateway/_/topology")"
fi

log "restarting distributor under traffic"
run_under_traffic restart compose restart -t 5 distributor
judge_traffic restart 5 "requests keep succeeding across docker-compose restart distributor"
if eventually 60 topology_has kv-2:9010 notice:9020; then
    pass "nodes register again with the restarted distributor"
else
    fail "nodes register again with the restarted distributor" "$(acurl -s --max-time 5 "$gateway/_/topology")"
fi

log "starting kv-1 again"
compose start kv-1 >/dev/null 2>&1 || true
if eventually 60 topology_has kv-1:9010 kv-2:9010; then
    pass "kv-1 rejoins after docker-compose start"
else
    fail "kv-1 rejoins after docker-compose start" "$(acurl -s --max-time 5 "$gateway/_/topology")"
fi
