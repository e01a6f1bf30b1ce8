#!/bin/sh
# The official postgres image's first start, in short: on an empty PGDATA, make a cluster whose superuser is
# POSTGRES_USER with POSTGRES_PASSWORD (password logins over the network, scram-sha-256), and the database
# POSTGRES_DB. Then, every start: the server in the foreground, on every address of the container's network.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: POSTGRES_PASSWORD is empty: set it (docker/.env) before the first start" >&2
        exit 2
    fi
    password=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password"
    initdb --username="$POSTGRES_USER" --pwfile="$password" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$password"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl --wait --options="-c listen_addresses=''" start
    if [ "$POSTGRES_DB" != postgres ]; then
        createdb --username="$POSTGRES_USER" "$POSTGRES_DB"
    fi
    pg_ctl --wait --mode=fast stop
fi
exec postgres -c listen_addresses='*'
