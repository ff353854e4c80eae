#!/usr/bin/env bash
# datasaver base backup and point-in-time restore benchmark (not a test):
# datasaver against pgBackRest on the same cluster, in the same run.
#
#   bash bench/physical.sh [--size-mb N] [--runs K] [--workdir DIR] [--keep]
#                          [--no-deps] [--no-build]
#
# Builds a throwaway PostgreSQL 15 cluster with the benchmark database of
# bench/backup.sh (about N MB, default 1000, scripts/sql/bench-data.sql),
# archiving its WAL to a local pgBackRest repository (zstd level 3, two
# processes: `apt-get install pgbackrest`, installed when missing), and a
# coordinator (local storage) with an agent streaming its WAL
# (DATASAVER_WAL=stream, release binaries; built if missing). Then K runs of:
#   (a) pgbackrest backup --type=full                     pgBackRest's base backup
#   (b) dsctl backup bench --physical                     datasaver's, end to end
#   pgbench -T S (untimed; S = --load-seconds), a time T noted in its middle
#   (c) pgbackrest restore --type=time --target=T, then the server started,
#       replaying to T and promoting, and shut down       pgBackRest's point-in-time restore
#   (d) dsctl restore --target bench --at T --physical    datasaver's (the same work)
# (a)/(b) and (c)/(d) alternate their order between runs. Each restore is
# checked (pgbench's balances agree with its history; no history row after
# T). Every figure is the median of its K runs; the runs are printed beside.
# Sizes: pgBackRest's backup set (du of its backup directory, the last run's)
# and datasaver's stored base object. During every pgbench run, `dsctl wal`
# is read every second: the largest lag (seconds, bytes) is reported. The
# agent's peak RSS (VmHWM) after everything: it streamed the WAL all along
# and took every base backup. The agent runs as the agent image runs it
# (MALLOC_ARENA_MAX=2, set in deploy/Dockerfile).
# Targets: (b) <= 1.0 x (a) at no larger size; (d) <= 1.0 x (c); agent peak
# RSS < 64 MiB; the WAL lag stays under 10 s.
#
# Options:
#   --size-mb N   approximate table data size in MB (default 1000; 100 is a quick run)
#   --runs K      timed runs of every measurement (default 3)
#   --load-seconds S  pgbench's run time (default 20): the WAL a restore
#                 replays grows with it
#   --workdir DIR work dir (default: a new ${TMPDIR:-/tmp}/datasaver-physical.XXXXXX)
#   --keep        keep the work dir
#   --no-deps     skip scripts/install-deps.sh and the pgbackrest install
#   --no-build    do not build; fail if the release binaries are missing
#
# Environment: DATASAVER_BIN_DIR=DIR uses the binaries in DIR.
# Exit status: 0 all targets met, 3 some target FAILed, 1 error.
set -euo pipefail

ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

size_mb=1000
runs=3
load_s=20
keep=0
deps=1
build=1
workdir=""
abspath() { if [[ "$1" = /* ]]; then echo "$1"; else echo "$ORIG_PWD/$1"; fi; }
while (($#)); do
    case "$1" in
        --size-mb)
            [[ $# -ge 2 ]] || die "--size-mb needs a number"
            size_mb=$2
            shift
            ;;
        --runs)
            [[ $# -ge 2 ]] || die "--runs needs a number"
            runs=$2
            shift
            ;;
        --load-seconds)
            [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -ge 2 ]] || die "--load-seconds needs a number of seconds (2 or more)"
            load_s=$2
            shift
            ;;
        --workdir)
            [[ $# -ge 2 ]] || die "--workdir needs a directory"
            workdir=$(abspath "$2")
            shift
            ;;
        --keep) keep=1 ;;
        --no-deps) deps=0 ;;
        --no-build) build=0 ;;
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
[[ "$size_mb" =~ ^[0-9]+$ ]] && ((size_mb >= 1)) || die "--size-mb must be a positive integer"
[[ "$runs" =~ ^[0-9]+$ ]] && ((10#$runs >= 1)) || die "--runs must be a positive integer"
runs=$((10#$runs))
TARGET=bench
AGENT_NAME=bench-agent

# ------------------------------------------------------------------ deps, binaries
if ((deps)); then
    step "Checking dependencies (scripts/install-deps.sh, pgbackrest)"
    bash scripts/install-deps.sh
    if ! command -v pgbackrest >/dev/null; then
        ((EUID == 0)) || die "pgbackrest is missing: apt-get install pgbackrest"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest >/dev/null
    fi
fi
command -v pgbackrest >/dev/null || die "pgbackrest not found (apt-get install pgbackrest)"
if ! ds_find_bins release; then
    ((build)) || die "release binaries missing in $DS_BIN_DIR (run without --no-build)"
    step "Building release binaries (cargo build --release --workspace)"
    cargo build --release --workspace
    ds_find_bins release || die "release binaries still missing in $DS_BIN_DIR"
fi
info "binaries: $DS_BIN_DIR; $(pgbackrest version)"

ds_prepare_workdir "$workdir" .datasaver-physical "$keep"
# The server and pgBackRest run as postgres: they need their way in.
chmod 0711 "$WORK"
as_pg() { ds_pg_as_owner "$@"; }
# The command prefix that runs a program as the server's user, for programs
# started in the background whose pid must be the program's own.
AS_PG=()
((EUID == 0)) && AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
pg_dir() {
    mkdir -p "$1"
    ((EUID == 0)) && chown postgres:postgres "$1"
    chmod 0700 "$1"
}

# ------------------------------------------------------------------ Postgres + data
step "Starting a throwaway PostgreSQL 15 cluster archiving to pgBackRest"
PWFILE="$WORK/db-password"
(
    umask 077
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$PWFILE"
)
ds_pg_init bench "$PWFILE"
PGBR_CONF="$WORK/pgbackrest.conf"
pg_dir "$WORK/pgbr-repo"
pg_dir "$WORK/pgbr-log"
pg_dir "$WORK/pgbr-lock"
pg_dir "$WORK/pgbr-spool"
write_pgbr_conf() {
    cat >"$PGBR_CONF" <<EOF
[global]
repo1-path=$WORK/pgbr-repo
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-async=n
spool-path=$WORK/pgbr-spool
log-path=$WORK/pgbr-log
lock-path=$WORK/pgbr-lock
log-level-console=warn
log-level-file=info

[bench]
pg1-path=$DS_PG_DATA
pg1-port=${DS_PG_PORT:-5432}
pg1-socket-path=$DS_PG_HOST
pg1-user=postgres
EOF
    chmod 0644 "$PGBR_CONF"
}
write_pgbr_conf
ds_pg_start "$WORK/postgres.log" -c shared_buffers=256MB -c max_wal_size=4GB \
    -c checkpoint_timeout=1h -c autovacuum=off -c archive_mode=on \
    -c "archive_command=pgbackrest --config=$PGBR_CONF --stanza=bench archive-push %p"
write_pgbr_conf
info "postgres pid $DS_PG_PID on 127.0.0.1:$DS_PG_PORT, data dir $DS_PG_DATA"
pgbr() { as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench "$@"; }
pgbr stanza-create >/dev/null

step "Generating ~${size_mb} MB of benchmark data in database '$TARGET'"
SQL=scripts/sql/bench-data.sql
ds_psql postgres -c "CREATE DATABASE $TARGET"
ds_psql "$TARGET" -v units="$size_mb" -v part=setup -f "$SQL" >"$WORK/gen-setup.log"
for p in documents measurements events accounts blobs; do
    ds_psql "$TARGET" -v units="$size_mb" -v part="$p" -f "$SQL" >"$WORK/gen-$p.log"
done
ds_psql "$TARGET" -v units="$size_mb" -v part=finish -f "$SQL" >>"$WORK/gen-setup.log"
"$DS_PG_BIN_DIR/pgbench" -i -q -s 10 -h "$DS_PG_HOST" -p "$DS_PG_PORT" -U postgres "$TARGET" \
    >"$WORK/pgbench-init.log" 2>&1
ds_psql "$TARGET" -c 'VACUUM (FREEZE, ANALYZE)' -c CHECKPOINT
DB_BYTES=$(ds_psql_val "$TARGET" "SELECT pg_database_size(current_database())")
info "database $((DB_BYTES / 1048576)) MiB"

# ------------------------------------------------------------------ datasaver up
step "Starting the coordinator and an agent streaming WAL"
ds_certs "$WORK/certs" "$AGENT_NAME" "$TARGET" >/dev/null
ds_start_coordinator "$WORK/coordinator" "$WORK/coordinator.log"
ds_start_agent "$AGENT_NAME" "$TARGET" "$TARGET" "$PWFILE" "$WORK/agent.log" \
    DATASAVER_WAL=stream DATASAVER_COMPRESSION_LEVEL=3 MALLOC_ARENA_MAX=2
ds_wait_agent "$TARGET" 30
info "coordinator pid $DS_COORDINATOR_PID, agent pid $DS_AGENT_PID"

# ------------------------------------------------------------------ measurements
declare -A T LABEL
LABEL[a]="pgbackrest backup --type=full"
LABEL[b]="dsctl backup --physical"
LABEL[c]="pgbackrest restore to T + recovery"
LABEL[d]="dsctl restore --at T --physical"
timed() {
    local key=$1 run=$2 start
    shift 2
    start=$(ds_now)
    "$@"
    T[$key,$run]=$(ds_elapsed "$start")
    info "($key) ${LABEL[$key]}, run $run/$runs: ${T[$key,$run]} s"
}
median_of() {
    local key=$1 r vals=()
    for ((r = 1; r <= runs; r++)); do vals+=("${T[$key,$r]}"); done
    T[$key]=$(ds_median "${vals[@]}")
    RUNS_OF[$key]=${vals[*]}
}
declare -A RUNS_OF
backup_a() { pgbr backup --type=full >"$WORK/a.log" 2>&1 || { cat "$WORK/a.log" >&2; die "pgbackrest backup failed"; }; }
backup_b() {
    ds_dsctl --json backup "$TARGET" --physical >"$WORK/b.json" 2>"$WORK/b.stderr" ||
        { cat "$WORK/b.stderr" >&2; ds_fail_with_logs "dsctl backup --physical failed"; }
}
# The server's clock now, to the millisecond (pgBackRest takes no more).
server_time() { ds_psql_val postgres "SELECT to_char(date_trunc('milliseconds', clock_timestamp()) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"; }
# T as pgBackRest writes times: "YYYY-MM-DD HH:MM:SS.mmm+00".
pgbr_time() { local t=${1/T/ }; echo "${t%Z}+00"; }
# A data directory for a restore, in a parent the server's user owns.
fresh_dir() {
    local d="$WORK/restore-$1"
    rm -rf "$d"
    pg_dir "$d"
    echo "$d/data"
}
# Starts the server on DIR, waits until it has recovered and promoted, and
# shuts it down (fast, clean).
recover_on() {
    local dir=$1 port log=$WORK/recover-$2.log
    port=$(ds_free_ports 1)
    : >"$log"
    "${AS_PG[@]}" "$DS_PG_BIN_DIR/postgres" -D "$dir" -p "$port" -c listen_addresses= \
        -c unix_socket_directories="$(dirname "$dir")" -c archive_mode=off \
        </dev/null >>"$log" 2>&1 &
    local pid=$! deadline=$((SECONDS + 3600))
    until grep -q "database system is ready to accept connections" "$log"; do
        ds_alive "$pid" || { tail -n 20 "$log" >&2; die "recovery failed on $dir"; }
        ((SECONDS < deadline)) || die "recovery did not finish"
        sleep 0.1
    done
    kill -INT "$pid"
    wait "$pid" || true
}
restore_c() {
    local dir
    dir=$(fresh_dir "c-$1")
    pgbr --pg1-path="$dir" restore --type=time --target="$(pgbr_time "$T_AT")" --target-action=promote \
        >"$WORK/c.log" 2>&1 || { cat "$WORK/c.log" >&2; die "pgbackrest restore failed"; }
    recover_on "$dir" "c-$1"
    RESTORED[c,$1]=$dir
}
restore_d() {
    local dir
    dir=$(fresh_dir "d-$1")
    ds_dsctl restore --target "$TARGET" --at "$T_AT" --physical --data-dir "$dir" \
        >"$WORK/d.out" 2>&1 || { cat "$WORK/d.out" >&2; ds_fail_with_logs "dsctl restore --physical failed"; }
    RESTORED[d,$1]=$dir
}
declare -A RESTORED
# check KEY RUN: start the restored directory, check pgbench's invariants
# and that nothing after T is there, stop it, delete it.
checks_ok=0
checks=0
check() {
    local dir=${RESTORED[$1,$2]} port sock log=$WORK/check-$1-$2.log
    port=$(ds_free_ports 1)
    sock=$(dirname "$dir")
    "${AS_PG[@]}" "$DS_PG_BIN_DIR/postgres" -D "$dir" -p "$port" -c listen_addresses= \
        -c unix_socket_directories="$sock" -c archive_mode=off </dev/null >"$log" 2>&1 &
    local pid=$!
    until "$DS_PG_BIN_DIR/pg_isready" -q -h "$sock" -p "$port"; do
        ds_alive "$pid" || die "the restored server ($1) does not start"
        sleep 0.1
    done
    local bad later
    bad=$("$DS_PG_BIN_DIR/psql" -X -qAt -h "$sock" -p "$port" -U postgres -d "$TARGET" -c "
        SELECT (SELECT count(*) FROM pgbench_accounts a LEFT JOIN (SELECT aid, sum(delta) s FROM pgbench_history GROUP BY aid) h USING (aid) WHERE a.abalance <> coalesce(h.s, 0))
             + (SELECT count(*) FROM pgbench_branches b LEFT JOIN (SELECT bid, sum(delta) s FROM pgbench_history GROUP BY bid) h USING (bid) WHERE b.bbalance <> coalesce(h.s, 0))")
    later=$("$DS_PG_BIN_DIR/psql" -X -qAt -h "$sock" -p "$port" -U postgres -d "$TARGET" -c \
        "SELECT count(*) FROM pgbench_history WHERE mtime > '$T_AT'::timestamptz")
    kill -INT "$pid"
    wait "$pid" || true
    checks=$((checks + 1))
    if [[ "$bad" == 0 && "$later" == 0 ]]; then
        checks_ok=$((checks_ok + 1))
        info "($1) restored to $T_AT: balances agree, nothing after T"
    else
        warn "($1) restored: $bad balances disagree, $later history rows after T"
    fi
    rm -rf "$(dirname "$dir")"
}
MAX_LAG_S=0
MAX_LAG_B=0
load() {
    "$DS_PG_BIN_DIR/pgbench" -n -c 4 -T "$load_s" -h "$DS_PG_HOST" -p "$DS_PG_PORT" -U postgres "$TARGET" \
        >"$WORK/pgbench.log" 2>&1 &
    local pid=$! i=0
    while ds_alive "$pid"; do
        i=$((i + 1))
        ((i == load_s / 2)) && T_AT=$(server_time)
        read -r s b < <(ds_dsctl --json wal --target "$TARGET" | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(v[0]["lag_seconds"], v[0]["lag_bytes"]) if v else print(0, 0)') || true
        ((${s:-0} > MAX_LAG_S)) && MAX_LAG_S=$s
        ((${b:-0} > MAX_LAG_B)) && MAX_LAG_B=$b
        sleep 1
    done
    wait "$pid" || die "pgbench failed: $(tail -n 5 "$WORK/pgbench.log")"
    [[ -n "${T_AT:-}" ]] || T_AT=$(server_time)
    # Until everything written is stored (and archived), untimed.
    sleep 3
    ds_psql postgres -c 'SELECT pg_switch_wal()' >/dev/null
    sleep 3
}

for ((run = 1; run <= runs; run++)); do
    step "Run $run/$runs"
    sync
    if ((run % 2)); then
        timed a "$run" backup_a
        sync
        timed b "$run" backup_b
    else
        timed b "$run" backup_b
        sync
        timed a "$run" backup_a
    fi
    info "agent VmHWM after the base backups: $(($(ds_vm_hwm_kib "$DS_AGENT_PID") / 1024)) MiB"
    load
    info "T = $T_AT; agent VmHWM after streaming the load: $(($(ds_vm_hwm_kib "$DS_AGENT_PID") / 1024)) MiB"
    sync
    if ((run % 2)); then
        timed c "$run" restore_c "$run"
        sync
        timed d "$run" restore_d "$run"
    else
        timed d "$run" restore_d "$run"
        sync
        timed c "$run" restore_c "$run"
    fi
    check c "$run"
    check d "$run"
    info "agent VmHWM so far: $(($(ds_vm_hwm_kib "$DS_AGENT_PID") / 1024)) MiB"
done
for k in a b c d; do median_of "$k"; done
PGBR_BYTES=$(du -sb "$(ls -d "$WORK"/pgbr-repo/backup/bench/*F | tail -n1)" | cut -f1)
DS_BYTES=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stored_bytes"])' "$WORK/b.json")
RSS_AGENT=$(ds_vm_hwm_kib "$DS_AGENT_PID")

# ------------------------------------------------------------------ report
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { printf "%.2f", x / y }'; }
verdict() { awk "BEGIN { exit !($1) }" && echo PASS || echo FAIL; }
rb=$(ratio "${T[b]}" "${T[a]}")
rd=$(ratio "${T[d]}" "${T[c]}")
step "Results (database $((DB_BYTES / 1048576)) MiB, medians of $runs run(s))"
printf '    %-40s %8s s   runs: %s\n' "(a) ${LABEL[a]}" "${T[a]}" "${RUNS_OF[a]}"
printf '    %-40s %8s s   runs: %s\n' "(b) ${LABEL[b]}" "${T[b]}" "${RUNS_OF[b]}"
printf '    %-40s %8s s   runs: %s\n' "(c) ${LABEL[c]}" "${T[c]}" "${RUNS_OF[c]}"
printf '    %-40s %8s s   runs: %s\n' "(d) ${LABEL[d]}" "${T[d]}" "${RUNS_OF[d]}"
failed=0
line() {
    local what=$1 v=$2
    echo "    $what: $v"
    [[ "$v" == *FAIL* ]] && failed=1
    return 0
}
line "base backup time (b)/(a) = $rb (<= 1.00)" "$(verdict "$rb <= 1.0")"
line "stored size: datasaver $DS_BYTES, pgBackRest $PGBR_BYTES bytes (<=)" "$(verdict "$DS_BYTES <= $PGBR_BYTES")"
line "point-in-time restore (d)/(c) = $rd (<= 1.00)" "$(verdict "$rd <= 1.0")"
line "agent peak RSS $((RSS_AGENT / 1024)) MiB (< 64)" "$(verdict "$RSS_AGENT < 65536")"
line "WAL lag under pgbench: max ${MAX_LAG_S} s, ${MAX_LAG_B} bytes (< 10 s)" "$(verdict "$MAX_LAG_S < 10")"
line "restores checked: $checks_ok of $checks consistent at T" "$(verdict "$checks_ok == $checks")"
((failed)) && exit 3
exit 0
