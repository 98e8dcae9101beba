#!/usr/bin/env bash
# Runs the whole set on this machine without Docker or an external database: builds the release
# binaries, starts distributor, gateway, kv-service and notice-service on their default ports with
# SQLite files under .stack/, waits until the gateway answers, prints examples to paste, and stops
# everything on Ctrl-C (or when any of them exits).
# Authentication is on, as in production: on first start it generates a cluster secret and a JWT
# key under .stack/ (mode 0600), and it prints a token with every scope, already in the examples.
# Logs go to .stack/logs/; RUST_LOG is passed through (default: info).
set -euo pipefail
cd "$(dirname "$0")/.."

stack=.stack
bin=${CARGO_TARGET_DIR:-target}/release
gateway_port=8000
ports=(9000 "$gateway_port" 9010 8395 9020)

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "${ports[@]}"; do
    if port_in_use "$port"; then
        echo "run-local: port $port is already in use (another stack running?); stop that first" >&2
        exit 1
    fi
done

echo "building the release binaries (cargo build --release)..."
cargo build --release -p distributor -p gateway -p kv-service -p notice-service

mkdir -p "$stack/logs"
chmod 700 "$stack"
# The secrets: made once, kept across restarts (delete them to rotate).
for secret in cluster.secret jwt.secret; do
    if [ ! -s "$stack/$secret" ]; then
        (umask 077 && head -c 32 /dev/urandom | base64 >"$stack/$secret")
    fi
done
cluster=(--cluster-secret-file "$stack/cluster.secret")
jwt=(--jwt-secret-file "$stack/jwt.secret")
token=$("$bin/gateway" mint-token "${jwt[@]}" --sub "${USER:-developer}" --scope admin --ttl 24h)
export RUST_LOG=${RUST_LOG:-info}
# The logs go to files: plain text, no colour codes.
export NO_COLOR=${NO_COLOR:-1}

pids=()
declare -A names
stopping=0
any_alive() {
    local pid
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && return 0
    done
    return 1
}
stop_all() {
    [ "$stopping" = 0 ] || return 0
    stopping=1
    trap - INT TERM
    echo
    echo "stopping..."
    [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
    # Graceful shutdown is bounded in each binary; anything still there after that is killed.
    local deadline=$(($(date +%s) + 15))
    while [ "$(date +%s)" -lt "$deadline" ] && any_alive; do
        sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "stopped; data stays in $stack/ (delete it to start afresh)"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

start() {
    local name=$1
    shift
    "$bin/$name" "$@" >"$stack/logs/$name.log" 2>&1 &
    pids+=($!)
    names[$!]=$name
}

wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$(($(date +%s) + seconds))
    until "$@"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "run-local: $what not ready after ${seconds}s; the logs end with:" >&2
            tail -n 5 "$stack"/logs/*.log >&2
            exit 1
        fi
        sleep 0.2
    done
}

start distributor --listen 127.0.0.1:9000 "${cluster[@]}"
wait_for "distributor" 10 port_in_use 9000
start kv-service --listen 127.0.0.1:9010 --text-listen 127.0.0.1:8395 --distributor 127.0.0.1:9000 \
    --store "sqlite:$stack/kv.db" "${cluster[@]}" "${jwt[@]}"
start notice-service --listen 127.0.0.1:9020 --distributor 127.0.0.1:9000 \
    --store "sqlite:$stack/notices.db" "${cluster[@]}"
start gateway --listen "127.0.0.1:$gateway_port" --distributor 127.0.0.1:9000 \
    --topology-cache "$stack/gateway-topology.json" "${cluster[@]}" "${jwt[@]}"

gateway=http://localhost:$gateway_port
healthy() { curl -sf --max-time 2 "$gateway/healthz" >/dev/null; }
# The gateway answers before every service has registered; wait until both routes are there.
routes_ready() {
    local topology
    topology=$(curl -sf --max-time 2 -H "Authorization: Bearer $token" "$gateway/_/topology") || return 1
    grep -q '"127.0.0.1:9010"' <<<"$topology" && grep -q '"127.0.0.1:9020"' <<<"$topology"
}
wait_for "gateway" 30 healthy
wait_for "kv-service and notice-service registration" 30 routes_ready

cat <<EOF

The stack is up. Gateway: $gateway  (status page: $gateway/)
  distributor 127.0.0.1:9000, kv-service 127.0.0.1:9010 (text protocol 127.0.0.1:8395),
  notice-service 127.0.0.1:9020; data in $stack/*.db, logs in $stack/logs/

A token with every scope (valid 24 h; the status page asks for it):
  export TOKEN=$token
More tokens: $bin/gateway mint-token --jwt-secret-file $stack/jwt.secret --sub alice --scope "kv:read notice:subscribe"

Try:
  curl -X PUT $gateway/kv/hello -H "Authorization: Bearer \$TOKEN" -d world
  curl $gateway/kv/hello -H "Authorization: Bearer \$TOKEN"
  curl '$gateway/kv?prefix=h' -H "Authorization: Bearer \$TOKEN"
  curl -X DELETE $gateway/kv/hello -H "Authorization: Bearer \$TOKEN"
  printf 'auth<%s>put<a,1>get<a>' "\$TOKEN" | nc -q1 127.0.0.1 8395
  curl -N $gateway/notices/stream -H "Authorization: Bearer \$TOKEN" &
  curl -X POST $gateway/notices -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"message":"hi"}'
  curl $gateway/_/topology -H "Authorization: Bearer \$TOKEN"

Ctrl-C stops everything.
EOF

# Runs until Ctrl-C, or until one of the processes ends (then the others are stopped too).
set +e
wait -n -p exited "${pids[@]}"
status=$?
set -e
if [ "$stopping" = 0 ]; then
    echo "run-local: ${names[${exited:-}]:-a process} exited (status $status); see $stack/logs/" >&2
    exit 1
fi
