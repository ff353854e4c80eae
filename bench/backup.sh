#!/usr/bin/env bash
# datasaver backup/restore benchmark (not a test): datasaver against plain
# pg_dump / pg_restore on the same database, in the same run.
#
#   bash bench/backup.sh [--size-mb N] [--runs K] [--level N] [--storage local|s3] [--keep]
#                        [--workdir DIR] [--no-deps] [--no-build] [--baselines-only]
#
# Builds a throwaway PostgreSQL 15 cluster (autovacuum off, see below) with a database `bench` of about
# N MB (default 1000) of data with realistic entropy (prose-like text, jsonb,
# numerics, timestamps, random bytea; generated inside Postgres), starts a
# coordinator (local storage, or with --storage s3 an S3-compatible server:
# s3s-fs from tests/install-s3-server.sh, SigV4 on, 16 MiB parts) and an agent
# (release binaries; built if missing), and times, wall clock, K runs of each of:
#   (a) pg_dump -Fc -Z0 > /dev/null          pg_dump's own speed
#   (b) pg_dump -Fc > file                   plain pg_dump, default gzip
#   (c) pg_dump -Fc -Z0 | zstd -3 > file
#   (d) dsctl backup bench                   datasaver, end to end
#   (e) createdb + pg_restore -d DB (b)'s file
#   (f) dsctl restore ID --target-db DB      datasaver, end to end (the last (d) backup)
# Every figure is the median of its K runs (the runs are printed next to it);
# every ratio and PASS/FAIL is computed from the medians. Output bytes are
# the last run's.
# After an untimed warm-up dump, backup run i times (a), (b), (c), (d) in that
# order, for i = 1..K; then restore run i times (e), (f) (odd i) or (f), (e)
# (even i): the server's state after one restore slows the next, so restores
# alternate and each starts from a CHECKPOINT. Every restored database is
# checked against `bench` (row counts and a hash of every row) and dropped
# before the next restore. Every timed run starts after `sync`, so none pays
# for writing back an earlier run's files.
# Peak RSS (VmHWM) of the agent and the coordinator, which run through all the
# runs: the max of the readings after every backup (the target's figure), and
# of those and the readings after every datasaver restore.  All clients connect the way
# the agent does (TCP, password).
# Prints a table with ratios and PASS/FAIL for the targets:
#   backup <= 1.10 x (a); backup >= 2.5 x faster than (b); stored bytes <= (b);
#   restore <= 1.05 x (e); agent peak RSS < 64 MiB; coordinator < 128 MiB;
#   every restored database identical to the source.
#
# Options:
#   --size-mb N       approximate table data size in MB (default 1000; 100 is a quick run)
#   --runs K          timed runs of every measurement, K >= 1 (default 3); the
#                     median is reported (with K = 1 just that run)
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
# Needs free disk of about 4 x N MB (the cluster lives under /tmp), plus about
# N/4 MB per run for datasaver's stored backups (all K are kept until the end).
# Exit status: 0 all targets met, 3 some target FAILed, 1 error.
set -euo pipefail

ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

size_mb=1000
runs=3
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
        --runs)
            [[ $# -ge 2 ]] || die "--runs needs a number"
            runs=$2
            shift
            ;;
        --runs=*) runs=${1#--runs=} ;;
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
if ! [[ "$runs" =~ ^[0-9]+$ ]] || ((10#$runs < 1)); then
    die "--runs must be a positive integer"
fi
runs=$((10#$runs))
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
    ds_certs "$WORK/certs" "$AGENT_NAME" "$TARGET" >/dev/null
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
# T[KEY,RUN]: wall seconds of one run; T[KEY]: the median of the runs;
# RUNS_OF[KEY]: the runs in order.  BYTES[KEY]: output bytes (of the last run).
declare -A T BYTES RUNS_OF LABEL
LABEL[a]="pg_dump -Fc -Z0 > /dev/null"
LABEL[b]="pg_dump -Fc > file (gzip)"
LABEL[c]="pg_dump -Fc -Z0 | zstd -3 > file"
LABEL[d]="datasaver: dsctl backup"
LABEL[e]="createdb + pg_restore (b)'s file"
LABEL[f]="datasaver: dsctl restore"
mib() { awk -v k="$1" 'BEGIN { if (k == "") print "-"; else printf "%.1f", k / 1024 }'; }
# note_peak VAR PID: VAR = the larger of VAR and PID's VmHWM now.  A later
# VmHWM reading can be lower than an earlier one (the kernel updates the
# high-water mark lazily and adds the live RSS only when it is read), so the
# peak figures are the max of readings taken after every run.
note_peak() {
    local -n peak=$1
    local v
    v=$(ds_vm_hwm_kib "$2")
    [[ -n "$v" ]] || return 0
    if [[ -z "$peak" ]] || ((v > peak)); then peak=$v; fi
}
# timed KEY RUN CMD...: run CMD, record its wall seconds in T[KEY,RUN].
timed() {
    local key=$1 run=$2
    shift 2
    local start
    start=$(ds_now)
    "$@"
    T[$key,$run]=$(ds_elapsed "$start")
    info "($key) ${LABEL[$key]}, run $run/$runs: ${T[$key,$run]} s"
}
# summarize KEY: the median of KEY's runs into T[KEY], the runs into RUNS_OF[KEY].
summarize() {
    local key=$1 r vals=()
    for ((r = 1; r <= runs; r++)); do vals+=("${T[$key,$r]}"); done
    T[$key]=$(ds_median "${vals[@]}")
    RUNS_OF[$key]=${vals[*]}
    info "($key) ${LABEL[$key]}: median ${T[$key]} s (runs: ${RUNS_OF[$key]})"
}
# Every timed run starts with no dirty page cache: (b) and (c) leave ~N/4 MB
# of file data to be written back in the background, which would otherwise
# land in whichever run comes next.
settle() { sync; }
# The server's state after one restore (dirty buffers, WAL) slows the next, so
# restores start from a checkpoint and alternate their order.
checkpoint() { ds_psql postgres -c CHECKPOINT >/dev/null; }

dump_a() { pgc pg_dump -Fc -Z0 "$TARGET" >/dev/null; }
dump_b() { pgc pg_dump -Fc -f "$WORK/b.dump" "$TARGET"; }
dump_c() { pgc pg_dump -Fc -Z0 "$TARGET" | zstd -q -f -3 -o "$WORK/c.dump.zst"; }
# d_run RUN: one datasaver backup; its JSON in $WORK/d-RUN.json.
d_run() {
    ds_dsctl --json backup "$TARGET" --label bench >"$WORK/d-$1.json" 2>"$WORK/d-$1.stderr" ||
        {
            cat "$WORK/d-$1.stderr" >&2
            ds_fail_with_logs "dsctl backup failed"
        }
}
restore_e() {
    pgc createdb "$1"
    pgc pg_restore -d "$1" "$WORK/b.dump"
}
f_run() {
    ds_dsctl restore "$BACKUP_ID" --target-db "$1" >"$WORK/f-$1.out" 2>&1 ||
        {
            cat "$WORK/f-$1.out" >&2
            ds_fail_with_logs "dsctl restore failed"
        }
}

step "Warm-up: pg_dump -Fc -Z0 > /dev/null (untimed)"
dump_a

RSS_AGENT=""
RSS_COORD=""
RSS_AGENT_ALL=""
RSS_COORD_ALL=""
BACKUP_ID=""
for ((run = 1; run <= runs; run++)); do
    if ((baselines_only)); then
        step "Backup run $run/$runs: (a), (b), (c)"
    else
        step "Backup run $run/$runs: (a), (b), (c), (d) dsctl backup $TARGET"
    fi
    settle
    timed a "$run" dump_a
    settle
    timed b "$run" dump_b
    BYTES[b]=$(stat -c %s "$WORK/b.dump")
    settle
    timed c "$run" dump_c
    BYTES[c]=$(stat -c %s "$WORK/c.dump.zst")
    ((baselines_only)) && continue
    settle
    timed d "$run" d_run "$run"
    read -r BACKUP_ID STORED_D RAW_D STATUS_D < <(python3 -c '
import json, sys
b = json.load(open(sys.argv[1]))
print(b["id"], b["stored_bytes"], b["raw_bytes"], b.get("status"))' "$WORK/d-$run.json") ||
        die "cannot read id/stored_bytes/raw_bytes from dsctl backup --json: $(head -c 500 "$WORK/d-$run.json")"
    BYTES[d]=$STORED_D
    info "backup $BACKUP_ID status $STATUS_D raw $RAW_D stored $STORED_D"
    info "VmHWM now: agent $(mib "$(ds_vm_hwm_kib "$DS_AGENT_PID")") MiB" \
        "(VmRSS $(mib "$(ds_vm_rss_kib "$DS_AGENT_PID")")), coordinator" \
        "$(mib "$(ds_vm_hwm_kib "$DS_COORDINATOR_PID")") MiB (VmRSS $(mib "$(ds_vm_rss_kib "$DS_COORDINATOR_PID")"))"
    note_peak RSS_AGENT "$DS_AGENT_PID"
    note_peak RSS_COORD "$DS_COORDINATOR_PID"
done
step "Backups: medians of $runs run(s)"
BYTES[a]=$(zstd -dc "$WORK/c.dump.zst" | wc -c)
summarize a
summarize b
summarize c
if ((!baselines_only)); then
    summarize d
    # The agent and the coordinator ran through all the backups: the max over them.
    RSS_AGENT_ALL=$RSS_AGENT
    RSS_COORD_ALL=$RSS_COORD
    stores=("$WORK/coordinator")
    [[ -d "$WORK/s3" ]] && stores+=("$WORK/s3")
    obj=$(find "${stores[@]}" -type f -path "*/$TARGET/logical/$BACKUP_ID.dump*" | head -n1)
    if [[ -n "$obj" ]]; then
        info "stored object of the last backup ${obj#"$WORK"/}: $(stat -c %s "$obj") bytes"
    else
        warn "no stored object found for $BACKUP_ID under $WORK/coordinator or $WORK/s3"
    fi
    if [[ "$RAW_D" != "${BYTES[a]}" ]]; then
        info "note: raw_bytes $RAW_D vs pg_dump -Z0 size ${BYTES[a]} (archives differ slightly in their headers)"
    fi
fi

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
restored=0
identical=0
# check_and_drop DB: compare DB with the source (untimed), then drop it, so
# every restore starts with only the source database in the cluster.
check_and_drop() {
    local start sig
    start=$(ds_now)
    sig=$(table_sig "$1")
    restored=$((restored + 1))
    if [[ "$sig" == "$SIG_SRC" ]]; then
        identical=$((identical + 1))
        info "$1: identical to $TARGET (row counts and a hash of every row; checked in $(ds_elapsed "$start") s); dropping it"
    else
        info "$1: DIFFERENT from $TARGET; dropping it"
    fi
    ds_psql postgres -c "DROP DATABASE $1" >/dev/null
}

for ((run = 1; run <= runs; run++)); do
    if ((baselines_only)); then
        order=(e)
    elif ((run % 2)); then
        order=(e f)
    else
        order=(f e)
    fi
    for key in "${order[@]}"; do
        db=restore_${key}_$run
        if [[ "$key" == e ]]; then
            step "Restore run $run/$runs: (e) createdb + pg_restore -d $db (b)'s file"
        else
            step "Restore run $run/$runs: (f) dsctl restore $BACKUP_ID --target-db $db"
        fi
        checkpoint
        settle
        if [[ "$key" == e ]]; then
            timed e "$run" restore_e "$db"
        else
            timed f "$run" f_run "$db"
            note_peak RSS_AGENT_ALL "$DS_AGENT_PID"
            note_peak RSS_COORD_ALL "$DS_COORDINATOR_PID"
        fi
        check_and_drop "$db"
    done
done
step "Restores: medians of $runs run(s)"
summarize e
if ((!baselines_only)); then
    summarize f
    note_peak RSS_AGENT_ALL "$DS_AGENT_PID"
    note_peak RSS_COORD_ALL "$DS_COORDINATOR_PID"
fi
restore_ok=$((identical == restored ? 1 : 0))

# ------------------------------------------------------------------ report
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
    printf '\n==> Results (%s MB requested; table data %s MiB, database %s MiB; storage %s; median of %s run(s); %s)\n\n' \
        "$size_mb" "$((DATA_BYTES / 1048576))" "$((DB_BYTES / 1048576))" "$storage" "$runs" "$(date -u +%FT%TZ)"
    row() { printf '    %-42s %9s %16s %12s %12s   %s\n' "$@"; }
    row "" "median s" "output bytes" "ds/this time" "ds/this size" "runs (wall s, in order)"
    row "(a) ${LABEL[a]}" "${T[a]}" "$(fmt_bytes "${BYTES[a]}")" "$(ratio "${T[d]}" "${T[a]}")" "$(ratio "${BYTES[d]}" "${BYTES[a]}")" "${RUNS_OF[a]}"
    row "(b) ${LABEL[b]}" "${T[b]}" "$(fmt_bytes "${BYTES[b]}")" "$(ratio "${T[d]}" "${T[b]}")" "$(ratio "${BYTES[d]}" "${BYTES[b]}")" "${RUNS_OF[b]}"
    row "(c) ${LABEL[c]}" "${T[c]}" "$(fmt_bytes "${BYTES[c]}")" "$(ratio "${T[d]}" "${T[c]}")" "$(ratio "${BYTES[d]}" "${BYTES[c]}")" "${RUNS_OF[c]}"
    row "(d) ${LABEL[d]}" "${T[d]:--}" "$(fmt_bytes "${BYTES[d]}")" "" "" "${RUNS_OF[d]:-}"
    row "(e) ${LABEL[e]}" "${T[e]}" "" "$(ratio "${T[f]}" "${T[e]}")" "" "${RUNS_OF[e]}"
    row "(f) ${LABEL[f]}" "${T[f]:--}" "" "" "" "${RUNS_OF[f]:-}"
    if ((!baselines_only)); then
        printf '\n    peak RSS (VmHWM), max over the %s backup(s):                agent %s MiB, coordinator %s MiB\n' \
            "$runs" "$(mib "$RSS_AGENT")" "$(mib "$RSS_COORD")"
        printf '    peak RSS (VmHWM), max over the %s backup(s) + restore(s):   agent %s MiB, coordinator %s MiB\n' \
            "$runs" "$(mib "$RSS_AGENT_ALL")" "$(mib "$RSS_COORD_ALL")"
    fi
    printf '\n    compression ratio (raw/stored): (b) %s  (c) %s  (d) %s\n' \
        "$(ratio "${BYTES[a]}" "${BYTES[b]}")" "$(ratio "${BYTES[a]}" "${BYTES[c]}")" "$(ratio "${BYTES[a]}" "${BYTES[d]}")"

    printf '\n    %-46s %-22s %s\n' "target (times: medians)" "measured" "result"
    trow() { printf '    %-46s %-22s %s\n' "$1" "$2" "$3"; }
    trow "backup time <= 1.10 x (a)" "d/a = $(ratio "${T[d]}" "${T[a]}")" "$(verdict "$(check "$(ratio "${T[d]}" "${T[a]}")" '<=' 1.10)")"
    trow "backup >= 2.5 x faster than (b)" "b/d = $(ratio "${T[b]}" "${T[d]}")" "$(verdict "$(check "$(ratio "${T[b]}" "${T[d]}")" '>=' 2.5)")"
    trow "stored bytes <= (b)'s file" "d/b = $(ratio "${BYTES[d]}" "${BYTES[b]}")" "$(verdict "$(check "${BYTES[d]}" '<=' "${BYTES[b]}")")"
    trow "restore time <= 1.05 x (e)" "f/e = $(ratio "${T[f]}" "${T[e]}")" "$(verdict "$(check "$(ratio "${T[f]}" "${T[e]}")" '<=' 1.05)")"
    trow "agent peak RSS < 64 MiB (max, backups)" "$(mib "$RSS_AGENT") MiB" "$(verdict "$(check "$RSS_AGENT" '<' 65536)")"
    trow "coordinator peak RSS < 128 MiB (max, backups)" "$(mib "$RSS_COORD") MiB" "$(verdict "$(check "$RSS_COORD" '<' 131072)")"
    trow "restored databases identical to source" "$identical of $restored" "$(verdict "$restore_ok")"
} | tee "$WORK/results.txt"

if grep -q ' FAIL$' "$WORK/results.txt"; then
    exit 3
fi
