#!/usr/bin/env bash
# Creates the cluster on first start (like the official image), then runs the server in the
# foreground as PID 1 so it receives the container's stop signal.
set -euo pipefail
shopt -s nullglob

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    POSTGRES_USER=${POSTGRES_USER:-postgres}
    POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        host_auth=scram-sha-256
    elif [ "${POSTGRES_HOST_AUTH_METHOD:-}" = trust ]; then
        host_auth=trust
    else
        echo "error: set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust to allow any client)" >&2
        exit 1
    fi
    echo "initializing a new cluster in $PGDATA"
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
        --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host="$host_auth" >/dev/null
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    # Other containers of the compose network connect from addresses only known at run time.
    echo "host all all all $host_auth" >>"$PGDATA/pg_hba.conf"

    # A socket-only server for the set-up steps, so nothing can connect over TCP (and no health
    # check passes) before the database is ready.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w -t 60 start >/dev/null
    psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres -q)
    if [ "$POSTGRES_DB" != postgres ]; then
        "${psql[@]}" --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
        *.sql) echo "running $script"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$script" ;;
        *.sh)
            echo "running $script"
            # shellcheck source=/dev/null
            . "$script"
            ;;
        *) echo "ignoring $script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    echo "cluster ready"
fi

exec "$@"
