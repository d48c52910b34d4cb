#!/usr/bin/env bash
# copilot's image entrypoint: PostgreSQL 15 from Debian with copilot preloaded and created.
# On the first start (an empty $PGDATA) it initialises a cluster the way the conventional postgres images do:
#   POSTGRES_PASSWORD          the superuser's password (required, unless POSTGRES_HOST_AUTH_METHOD=trust)
#   POSTGRES_USER              the superuser's name (default postgres)
#   POSTGRES_DB                the database created for it (default: $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS       more arguments for initdb
#   POSTGRES_HOST_AUTH_METHOD  pg_hba's method for TCP connections (default scram-sha-256)
#   /docker-entrypoint-initdb.d/*.sql, *.sh   run once, in name order, against $POSTGRES_DB
# and, for copilot:
#   COPILOT_MODEL              the model (default: the one baked into the image, $COPILOT_DEFAULT_MODEL, written
#                              into postgresql.conf on the first start; ALTER SYSTEM SET copilot.model changes it)
#   COPILOT_THREADS            inference threads (default: the CPUs the container sees)
#   COPILOT_DEMO=1             load the demo database (Spider's concert_singer) into $POSTGRES_DB
# The extension is created in template1 and $POSTGRES_DB, so every database made later has it too.
# `docker run IMAGE` runs postgres; `docker run IMAGE -c work_mem=64MB` passes the flags to it; any other command
# runs as given.
set -Eeuo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
export PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
log() { echo "copilot-entrypoint: $*" >&2; }

if [ "${1:-}" = "" ]; then set -- postgres; fi
if [ "${1:0:1}" = "-" ]; then set -- postgres "$@"; fi
if [ "$1" != postgres ]; then
  exec "$@"
fi
shift

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
    log "the database is uninitialised and POSTGRES_PASSWORD is not set."
    log "Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without one)."
    exit 1
  fi
  log "initialising a cluster in $PGDATA"
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
  chown postgres "$pwfile"
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words by convention
  as_postgres "$PG_BIN/initdb" -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host="$auth" ${POSTGRES_INITDB_ARGS:-} >/dev/null
  rm -f "$pwfile"
  {
    echo "host all all all $auth"
  } >> "$PGDATA/pg_hba.conf"
  {
    echo "# copilot's image"
    echo "listen_addresses = '*'"
    echo "shared_preload_libraries = 'copilot'"
    if [ -n "${COPILOT_DEFAULT_MODEL:-}" ]; then echo "copilot.model = '$COPILOT_DEFAULT_MODEL'"; fi
  } >> "$PGDATA/postgresql.conf"

  # A private server on the socket only while the databases are made.
  as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses='' -c shared_preload_libraries=''" start >/dev/null
  psql_() { as_postgres psql -v ON_ERROR_STOP=1 -X -q --username "$POSTGRES_USER" "$@"; }
  if [ "$POSTGRES_DB" != postgres ]; then
    psql_ -d postgres -v db="$POSTGRES_DB" <<<'CREATE DATABASE :"db"'
  fi
  psql_ -d template1 -c "CREATE EXTENSION IF NOT EXISTS copilot"
  psql_ -d "$POSTGRES_DB" -c "CREATE EXTENSION IF NOT EXISTS copilot"
  if [ "${COPILOT_DEMO:-0}" = 1 ]; then
    log "loading the demo database (concert_singer) into $POSTGRES_DB"
    psql_ -d "$POSTGRES_DB" -f /usr/share/copilot/demo.sql >/dev/null
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    [ -e "$f" ] || continue
    case "$f" in
      *.sql) log "running $f"; psql_ -d "$POSTGRES_DB" -f "$f" ;;
      *.sh) log "running $f"; # shellcheck disable=SC1090
        . "$f" ;;
      *) log "ignoring $f" ;;
    esac
  done
  as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  log "initialised"
fi

# Settings from the environment go on postgres's command line (they override postgresql.conf and ALTER SYSTEM);
# without them the image's defaults hold: the baked-in model (postgresql.conf) and as many
# inference threads as the container has CPUs.
extra=(-c "copilot.threads=${COPILOT_THREADS:-$(nproc)}")
if [ -n "${COPILOT_MODEL:-}" ]; then extra+=(-c "copilot.model=$COPILOT_MODEL"); fi
log "starting PostgreSQL with copilot (model: ${COPILOT_MODEL:-the default baked into the image})"
exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$PG_BIN/postgres" -D "$PGDATA" "${extra[@]}" "$@"
