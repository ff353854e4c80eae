#!/usr/bin/env bash
# datasaver backup/restore benchmark (not a test): datasaver against plain
# pg_dump / pg_restore on the same database, in the same run.
#
#   bash bench/backup.sh [--size-mb N] [--level N] [--storage local|s3] [--keep]
#                        [--workdir DIR] [--no-deps] [--no-build] [--baselines-only]
#
# Builds a throwaway PostgreSQL 15 cluster (autovacuum off, see below) with a database `bench` of about
# N MB (default 1000) of data with realistic entropy (prose-like text, jsonb,
# numerics, timestamps, random bytea; generated inside Postgres), starts a
# coordinator (local storage, or with --storage s3 an S3-compatible server:
# s3s-fs from tests/install-s3-server.sh, SigV4 on, 16 MiB parts) and an agent
# (release binaries; built if missing), and times, wall clock:
#   (a) pg_dump -Fc -Z0 > /dev/null          pg_dump's own speed  (a, d: best of two)
#   (b) pg_dump -Fc > file                   plain pg_dump, default gzip
#   (c) pg_dump -Fc -Z0 | zstd -3 > file
#   (d) dsctl backup bench                   datasaver, end to end
#   (e) createdb + pg_restore -d DB (b)'s file   (restores: best of two, alternating order)
#   (f) dsctl restore ID --target-db DB      datasaver, end to end
# and reads the agent's and the coordinator's peak RSS (VmHWM) after the
# backup.  All clients connect the way the agent does (TCP, password).
# Prints a table with ratios and PASS/FAIL for the targets:
#   backup <= 1.10 x (a); backup >= 2.5 x faster than (b); stored bytes <= (b);
#   restore <= 1.05 x (e); agent peak RSS < 64 MiB; coordinator < 128 MiB.
#
# Options:
#   --size-mb N       approximate table data size in MB (default 1000; 100 is a quick run)
#   --level N         DATASAVER_COMPRESSION_LEVEL for the agent (default: the agent's)
#   --storage KIND    local (default) or s3: where the coordinator stores backups
#   --workdir DIR     dumps, certs, coordinator storage, logs (default: a new
#                     ${TMPDIR:-/tmp}/datasaver-bench.XXXXXX; wiped at start, deleted
#                     at the end unless --keep)
#   --keep            keep the work dir
#   --no-deps         skip scripts/install-deps.sh
#   --no-build        do not build; fail if the release binaries are missing
#   --baselines-only  only the pg_dump/pg_restore baselines (no datasaver)
#
# Environment: DATASAVER_BIN_DIR=DIR uses the binaries in DIR (no cargo build).
# Needs free disk of about 4 x N MB (the cluster lives under /tmp).
# Exit status: 0 all targets met, 3 some target FAILed, 1 error.
set -euo pipefail

ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

size_mb=1000
level=""
keep=0
deps=1
build=1
baselines_only=0
storage=local
workdir=""
abspath() { if [[ "$1" = /* ]]; then echo "$1"; else echo "$ORIG_PWD/$1"; fi; }
while (($#)); do
    case "$1" in
        --size-mb)
            [[ $# -ge 2 ]] || die "--size-mb needs a number"
            size_mb=$2
            shift
            ;;
        --size-mb=*) size_mb=${1#--size-mb=} ;;
        --level)
            [[ $# -ge 2 ]] || die "--level needs a number"
            level=$2
            shift
            ;;
        --level=*) level=${1#--level=} ;;
        --storage)
            [[ $# -ge 2 ]] || die "--storage needs local or s3"
            storage=$2
            shift
            ;;
        --storage=*) storage=${1#--storage=} ;;
        --workdir)
            [[ $# -ge 2 ]] || die "--workdir needs a directory"
            workdir=$(abspath "$2")
            shift
            ;;
        --workdir=*) workdir=$(abspath "${1#--workdir=}") ;;
        --keep) keep=1 ;;
        --no-deps) deps=0 ;;
        --no-build) build=0 ;;
        --baselines-only) baselines_only=1 ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *)
            echo "unknown option: $1 (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done
if ! [[ "$size_mb" =~ ^[0-9]+$ ]] || ((size_mb < 1)); then
    die "--size-mb must be a positive integer"
fi
[[ -z "$level" || "$level" =~ ^-?[0-9]+$ ]] || die "--level must be an integer"
[[ "$storage" == local || "$storage" == s3 ]] || die "--storage must be local or s3"

TARGET=bench
AGENT_NAME=bench-agent

# ------------------------------------------------------------------ deps, binaries
if ((deps)); then
    step "Checking dependencies (scripts/install-deps.sh)"
    bash scripts/install-deps.sh
fi
command -v zstd >/dev/null || die "zstd not found (scripts/install-deps.sh installs it)"
if ((!baselines_only)); then
    if ! ds_find_bins release; then
        ((build)) || die "release binaries missing in $DS_BIN_DIR (run without --no-build)"
        step "Building release binaries (cargo build --release --workspace)"
        cargo build --release --workspace
        ds_find_bins release || die "release binaries still missing in $DS_BIN_DIR"
    fi
    info "binaries: $DS_BIN_DIR"
fi

# ------------------------------------------------------------------ work dir
ds_prepare_workdir "$workdir" .datasaver-bench "$keep"

# ------------------------------------------------------------------ Postgres + data
step "Starting a throwaway PostgreSQL 15 cluster"
PWFILE="$WORK/db-password"
(
    umask 077
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$PWFILE"
)
ds_pg_init bench "$PWFILE"
# autovacuum off: after each ~1 GB restore it vacuums and analyzes the new
# database in the background, slowing whichever restore runs next (with it on,
# the four restores of one run took 15.9, 17.4, 18.3 and 20.3 s in order, which
# made "best of two" favour the first position; with it off, 15.5-16.3 s).
ds_pg_start "$WORK/postgres.log" -c shared_buffers=256MB -c max_wal_size=8GB \
    -c checkpoint_timeout=1h -c maintenance_work_mem=256MB -c autovacuum=off
info "postgres pid $DS_PG_PID on 127.0.0.1:$DS_PG_PORT, data dir $DS_PG_DATA"

# pgc PROGRAM ARGS...: a client program connecting like the agent (TCP + password).
pgc() {
    local prog=$1
    shift
    PGPASSWORD=$(<"$PWFILE") "$DS_PG_BIN_DIR/$prog" -h 127.0.0.1 -p "$DS_PG_PORT" -U postgres "$@"
}

step "Generating ~${size_mb} MB of benchmark data in database '$TARGET'"
gen_start=$(ds_now)
SQL=scripts/sql/bench-data.sql
ds_psql postgres -c "CREATE DATABASE $TARGET"
ds_psql "$TARGET" -v units="$size_mb" -v part=setup -f "$SQL" >"$WORK/gen-setup.log"
info "vocabulary ready ($(ds_elapsed "$gen_start") s); loading tables in 2 sessions"
# Two sessions for two cores, balanced by generation time.
gen_pids=()
for parts in "documents measurements" "events accounts blobs"; do
    (
        for p in $parts; do
            ds_psql "$TARGET" -v units="$size_mb" -v part="$p" -f "$SQL"
        done
    ) >"$WORK/gen-${parts%% *}.log" 2>&1 &
    gen_pids+=($!)
    ds_register_cleanup ds_stop_pid "$!" "data generator" TERM 5
done
for pid in "${gen_pids[@]}"; do
    wait "$pid" || {
        cat "$WORK"/gen-*.log >&2
        die "data generation failed"
    }
done
ds_psql "$TARGET" -v units="$size_mb" -v part=finish -f "$SQL" >>"$WORK/gen-setup.log"
info "tables loaded ($(ds_elapsed "$gen_start") s); VACUUM (FREEZE, ANALYZE) and CHECKPOINT"
ds_psql "$TARGET" -c 'VACUUM (FREEZE, ANALYZE)' -c CHECKPOINT
info "generated in $(ds_elapsed "$gen_start") s"
ds_psql "$TARGET" -c "
    SELECT c.relname AS table, to_char(c.reltuples, 'FM999,999,999,999') AS rows,
           pg_size_pretty(pg_table_size(c.oid)) AS data, pg_size_pretty(pg_indexes_size(c.oid)) AS indexes
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND n.nspname = 'public' ORDER BY pg_table_size(c.oid) DESC"
DB_BYTES=$(ds_psql_val "$TARGET" "SELECT pg_database_size(current_database())")
DATA_BYTES=$(ds_psql_val "$TARGET" "
    SELECT sum(pg_table_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND n.nspname = 'public'")
info "table data $((DATA_BYTES / 1048576)) MiB, database $((DB_BYTES / 1048576)) MiB"

# ------------------------------------------------------------------ datasaver up
if ((!baselines_only)); then
    step "Starting coordinator and agent"
    ds_certs "$WORK/certs" "$AGENT_NAME" >/dev/null
    coord_env=()
    if [[ "$storage" == s3 ]]; then
        S3FS=$(bash tests/install-s3-server.sh)
        mkdir -p "$WORK/s3/bench"
        S3_PORT=$(ds_free_ports 1)
        S3_SECRET_FILE="$WORK/s3-secret"
        (
            umask 077
            od -An -tx1 -N20 /dev/urandom | tr -d ' \n' >"$S3_SECRET_FILE"
        )
        # A throwaway local test server: its keys on its own argv are acceptable here.
        "$S3FS" --host 127.0.0.1 --port "$S3_PORT" --access-key benchkey \
            --secret-key "$(<"$S3_SECRET_FILE")" "$WORK/s3" </dev/null >"$WORK/s3s-fs.log" 2>&1 &
        S3_PID=$!
        ds_register_cleanup ds_stop_pid "$S3_PID" s3s-fs TERM 5
        for _ in $(seq 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break
            sleep 0.1
        done
        info "s3s-fs pid $S3_PID on 127.0.0.1:$S3_PORT (bucket 'bench' under $WORK/s3)"
        coord_env+=(DATASAVER_STORAGE_BACKEND=s3 DATASAVER_S3_BUCKET=bench
            DATASAVER_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" DATASAVER_S3_FORCE_PATH_STYLE=true
            DATASAVER_S3_ACCESS_KEY=benchkey DATASAVER_S3_SECRET_KEY_FILE="$S3_SECRET_FILE")
    fi
    ds_start_coordinator "$WORK/coordinator" "$WORK/coordinator.log" "${coord_env[@]}"
    agent_env=()
    [[ -n "$level" ]] && agent_env+=("DATASAVER_COMPRESSION_LEVEL=$level")
    ds_start_agent "$AGENT_NAME" "$TARGET" "$TARGET" "$PWFILE" "$WORK/agent.log" "${agent_env[@]}"
    ds_wait_agent "$TARGET" 30
    info "coordinator pid $DS_COORDINATOR_PID, agent pid $DS_AGENT_PID"
fi

# ------------------------------------------------------------------ measurements
declare -A T BYTES
min_of() { python3 -c 'import sys; print(min(float(x) for x in sys.argv[1:]))' "$@"; }
# timed KEY CMD...: run CMD, record wall seconds in T[KEY].
timed() {
    local key=$1
    shift
    local start
    start=$(ds_now)
    "$@"
    T[$key]=$(ds_elapsed "$start")
    info "($key) ${T[$key]} s"
}
dump_a() { pgc pg_dump -Fc -Z0 "$TARGET" >/dev/null; }
dump_b() { pgc pg_dump -Fc -f "$WORK/b.dump" "$TARGET"; }
dump_c() { pgc pg_dump -Fc -Z0 "$TARGET" | zstd -q -3 -o "$WORK/c.dump.zst"; }
restore_e() {
    pgc createdb "$1"
    pgc pg_restore -d "$1" "$WORK/b.dump"
}
# The server's state after one restore (dirty buffers, WAL) slows the next, so
# restores start from a checkpoint and run twice in alternating order.
checkpoint() { ds_psql postgres -c CHECKPOINT >/dev/null; }

step "Warm-up: pg_dump -Fc -Z0 > /dev/null (untimed)"
dump_a

step "(a) pg_dump -Fc -Z0 > /dev/null   (best of two)"
timed a1 dump_a
timed a2 dump_a
T[a]=$(min_of "${T[a1]}" "${T[a2]}")
step "(b) pg_dump -Fc -f FILE   (default gzip)"
timed b dump_b
BYTES[b]=$(stat -c %s "$WORK/b.dump")
step "(c) pg_dump -Fc -Z0 | zstd -3 -o FILE"
timed c dump_c
BYTES[c]=$(stat -c %s "$WORK/c.dump.zst")
BYTES[a]=$(zstd -dc "$WORK/c.dump.zst" | wc -c)

RSS_AGENT=""
RSS_COORD=""
if ((!baselines_only)); then
    step "(d) dsctl backup $TARGET"
    d_run() {
        ds_dsctl --json backup "$TARGET" --label bench >"$WORK/d.json" 2>"$WORK/d.stderr" ||
            {
                cat "$WORK/d.stderr" >&2
                ds_fail_with_logs "dsctl backup failed"
            }
    }
    # best of two, like (a)
    timed d1 d_run
    timed d2 d_run
    T[d]=$(min_of "${T[d1]}" "${T[d2]}")
    RSS_AGENT=$(ds_vm_hwm_kib "$DS_AGENT_PID")
    RSS_COORD=$(ds_vm_hwm_kib "$DS_COORDINATOR_PID")
    read -r BACKUP_ID STORED_D RAW_D STATUS_D < <(python3 -c '
import json, sys
b = json.load(open(sys.argv[1]))
print(b["id"], b["stored_bytes"], b["raw_bytes"], b.get("status"))' "$WORK/d.json") ||
        die "cannot read id/stored_bytes/raw_bytes from dsctl backup --json: $(head -c 500 "$WORK/d.json")"
    BYTES[d]=$STORED_D
    info "backup $BACKUP_ID status $STATUS_D raw $RAW_D stored $STORED_D"
    stores=("$WORK/coordinator")
    [[ -d "$WORK/s3" ]] && stores+=("$WORK/s3")
    obj=$(find "${stores[@]}" -type f -path "*/$TARGET/logical/$BACKUP_ID.dump*" | head -n1)
    if [[ -n "$obj" ]]; then
        info "stored object ${obj#"$WORK"/}: $(stat -c %s "$obj") bytes"
    else
        warn "no stored object found for $BACKUP_ID under $WORK/coordinator or $WORK/s3"
    fi
    if [[ "$RAW_D" != "${BYTES[a]}" ]]; then
        info "note: raw_bytes $RAW_D vs pg_dump -Z0 size ${BYTES[a]} (archives differ slightly in their headers)"
    fi
fi

f_run() {
    ds_dsctl restore "$BACKUP_ID" --target-db "$1" >"$WORK/f.out" 2>&1 ||
        {
            cat "$WORK/f.out" >&2
            ds_fail_with_logs "dsctl restore failed"
        }
}
step "(e) createdb + pg_restore -d restore_e (b)'s file"
checkpoint
timed e1 restore_e restore_e
if ((!baselines_only)); then
    step "(f) dsctl restore $BACKUP_ID --target-db restore_f"
    checkpoint
    timed f1 f_run restore_f
    step "(f) again, first this time: dsctl restore $BACKUP_ID --target-db restore_f2"
    checkpoint
    timed f2 f_run restore_f2
    RSS_AGENT_ALL=$(ds_vm_hwm_kib "$DS_AGENT_PID")
    RSS_COORD_ALL=$(ds_vm_hwm_kib "$DS_COORDINATOR_PID")
fi
step "(e) again: createdb + pg_restore -d restore_e2"
checkpoint
timed e2 restore_e restore_e2
T[e]=$(min_of "${T[e1]}" "${T[e2]}")
info "(e) best of two: ${T[e]} s"
if ((!baselines_only)); then
    T[f]=$(min_of "${T[f1]}" "${T[f2]}")
    info "(f) best of two: ${T[f]} s"
    ds_psql postgres -c "DROP DATABASE restore_f2" >/dev/null
fi
ds_psql postgres -c "DROP DATABASE restore_e2" >/dev/null

step "Checking the restored databases (row counts and a hash of every row)"
table_sig() {
    ds_psql_val "$1" "
        SELECT string_agg(s, ' ' ORDER BY s) FROM (
          SELECT 'accounts:' || count(*) || ':' || sum(hashtext(x::text)::bigint) AS s FROM accounts x
          UNION ALL SELECT 'events:' || count(*) || ':' || sum(hashtext(x::text)::bigint) FROM events x
          UNION ALL SELECT 'documents:' || count(*) || ':' || sum(hashtext(x::text)::bigint) FROM documents x
          UNION ALL SELECT 'measurements:' || count(*) || ':' || sum(hashtext(x::text)::bigint) FROM measurements x
          UNION ALL SELECT 'blobs:' || count(*) || ':' || sum(hashtext(x::text)::bigint) FROM blobs x) q"
}
SIG_SRC=$(table_sig "$TARGET")
restore_ok=1
dbs=(restore_e)
((baselines_only)) || dbs+=(restore_f)
for db in "${dbs[@]}"; do
    if [[ "$(table_sig "$db")" == "$SIG_SRC" ]]; then
        info "$db: identical to $TARGET"
    else
        info "$db: DIFFERENT from $TARGET"
        restore_ok=0
    fi
done

# ------------------------------------------------------------------ report
mib() { awk -v k="$1" 'BEGIN { if (k == "") print "-"; else printf "%.1f", k / 1024 }'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { if (x == "" || y == "" || y == 0) print "-"; else printf "%.2f", x / y }'; }
fmt_bytes() { if [[ -z "$1" ]]; then echo -; else sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; fi; }
verdict() { awk -v ok="$1" 'BEGIN { print (ok == "" ? "n/a" : (ok ? "PASS" : "FAIL")) }'; }
# check EXPR: 1/0 from an awk condition, or empty when a value is missing.
check() {
    local a=$1 op=$2 b=$3
    [[ -z "$a" || -z "$b" || "$a" == - || "$b" == - ]] && return 0
    awk -v a="$a" -v b="$b" "BEGIN { print (a $op b) ? 1 : 0 }"
}

T[d]=${T[d]:-}
T[f]=${T[f]:-}
BYTES[d]=${BYTES[d]:-}
{
    printf '\n==> Results (%s MB requested; table data %s MiB, database %s MiB; storage %s; %s)\n\n' \
        "$size_mb" "$((DATA_BYTES / 1048576))" "$((DB_BYTES / 1048576))" "$storage" "$(date -u +%FT%TZ)"
    printf '    %-42s %9s %16s %12s %12s\n' "" "wall s" "output bytes" "ds/this time" "ds/this size"
    row() { printf '    %-42s %9s %16s %12s %12s\n' "$1" "$2" "$3" "$4" "$5"; }
    row "(a) pg_dump -Fc -Z0 > /dev/null" "${T[a]}" "$(fmt_bytes "${BYTES[a]}")" "$(ratio "${T[d]}" "${T[a]}")" "$(ratio "${BYTES[d]}" "${BYTES[a]}")"
    row "(b) pg_dump -Fc > file (gzip)" "${T[b]}" "$(fmt_bytes "${BYTES[b]}")" "$(ratio "${T[d]}" "${T[b]}")" "$(ratio "${BYTES[d]}" "${BYTES[b]}")"
    row "(c) pg_dump -Fc -Z0 | zstd -3 > file" "${T[c]}" "$(fmt_bytes "${BYTES[c]}")" "$(ratio "${T[d]}" "${T[c]}")" "$(ratio "${BYTES[d]}" "${BYTES[c]}")"
    row "(d) datasaver: dsctl backup" "${T[d]:--}" "$(fmt_bytes "${BYTES[d]}")" "" ""
    row "(e) createdb + pg_restore (b)'s file" "${T[e]}" "" "$(ratio "${T[f]}" "${T[e]}")" ""
    row "(f) datasaver: dsctl restore" "${T[f]:--}" "" "" ""
    printf '\n    peak RSS (VmHWM) after the backup:  agent %s MiB, coordinator %s MiB\n' "$(mib "$RSS_AGENT")" "$(mib "$RSS_COORD")"
    if ((!baselines_only)); then
        printf '    peak RSS after backup + restore:    agent %s MiB, coordinator %s MiB\n' "$(mib "$RSS_AGENT_ALL")" "$(mib "$RSS_COORD_ALL")"
    fi
    printf '    compression ratio (raw/stored): (b) %s  (c) %s  (d) %s\n' \
        "$(ratio "${BYTES[a]}" "${BYTES[b]}")" "$(ratio "${BYTES[a]}" "${BYTES[c]}")" "$(ratio "${BYTES[a]}" "${BYTES[d]}")"

    printf '\n    %-46s %-22s %s\n' "target" "measured" "result"
    trow() { printf '    %-46s %-22s %s\n' "$1" "$2" "$3"; }
    trow "backup time <= 1.10 x (a)" "d/a = $(ratio "${T[d]}" "${T[a]}")" "$(verdict "$(check "$(ratio "${T[d]}" "${T[a]}")" '<=' 1.10)")"
    trow "backup >= 2.5 x faster than (b)" "b/d = $(ratio "${T[b]}" "${T[d]}")" "$(verdict "$(check "$(ratio "${T[b]}" "${T[d]}")" '>=' 2.5)")"
    trow "stored bytes <= (b)'s file" "d/b = $(ratio "${BYTES[d]}" "${BYTES[b]}")" "$(verdict "$(check "${BYTES[d]}" '<=' "${BYTES[b]}")")"
    trow "restore time <= 1.05 x (e)" "f/e = $(ratio "${T[f]}" "${T[e]}")" "$(verdict "$(check "$(ratio "${T[f]}" "${T[e]}")" '<=' 1.05)")"
    trow "agent peak RSS < 64 MiB" "$(mib "$RSS_AGENT") MiB" "$(verdict "$(check "$RSS_AGENT" '<' 65536)")"
    trow "coordinator peak RSS < 128 MiB" "$(mib "$RSS_COORD") MiB" "$(verdict "$(check "$RSS_COORD" '<' 131072)")"
    trow "restored databases identical to source" "" "$(verdict "$restore_ok")"
} | tee "$WORK/results.txt"

if grep -q ' FAIL$' "$WORK/results.txt"; then
    exit 3
fi
