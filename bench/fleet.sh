#!/usr/bin/env bash
# datasaver fleet benchmark (not a test): N agents on one coordinator, all N
# backups requested at once, with local and with S3 storage; plain
# pg_dump | zstd on the same databases, in the same run, for context.
#
#   bash bench/fleet.sh [--agents N] [--rows R] [--storage local|s3|both] [--limit N]
#                       [--runs K] [--keep] [--workdir DIR] [--no-deps] [--no-build]
#
# Builds one throwaway PostgreSQL 15 cluster (autovacuum off, max_connections
# 2N+20) holding N databases f01..fNN, each with one table of R rows of md5 text
# and random numbers (default 30000 rows: about 5 MiB of table data that zstd
# shrinks only about 2x; generated inside Postgres, different in every database).
# Then, for each storage (local; S3 = s3s-fs from tests/install-s3-server.sh,
# SigV4 on, on a free loopback port) and each of K runs, it starts a coordinator
# (fresh data dir or bucket; concurrency limit: its default, i.e.
# DATASAVER_MAX_CONCURRENT_BACKUPS unset = 4, or --limit) and N agents (release
# binaries; target = agent name = database name), waits until `dsctl agents`
# lists all N, starts N `dsctl backup TARGET` processes together, and measures:
#   wall time from the requests to the last completion;
#   completions: completed backups in `dsctl --json list`, and dsctl exit codes 0;
#   the most backups running at once (from the backups' start and finish times);
#   coordinator peak RSS (VmHWM) after the burst, and its RSS (VmRSS) 10 s later;
#   agents' peak RSS (VmHWM): median and max over the N agents.
# Every run starts a new coordinator and new agents (fresh catalog, fresh
# VmHWM), so the K runs are independent samples.
# Baseline, K times: the same N databases with
#   pg_dump -Fc -Z0 DB | zstd -3 > FILE, LIMIT at a time (xargs -P LIMIT).
# Prints every run, medians of the K runs, datasaver's wall time as a ratio of
# the baseline's, a summary of WARN/ERROR lines in the logs, and PASS/FAIL for
# the targets, per storage:
#   every backup completes (all runs); coordinator peak RSS (median) < 128 MiB
#   with local storage, < 256 MiB with S3; agent peak RSS (median over the runs
#   of the largest agent) < 64 MiB.
#
# Options:
#   --agents N        agents = databases = backups per burst (default 60)
#   --rows R          rows per database (default 30000, about 5 MiB of table data)
#   --storage KIND    local, s3 or both (default both)
#   --limit N         DATASAVER_MAX_CONCURRENT_BACKUPS for the coordinator and
#                     the baseline's parallelism (default: unset, the coordinator's 4)
#   --runs K          timed bursts per storage and baseline runs (default 3)
#   --workdir DIR     certs, logs, dumps, storage (default: a new
#                     ${TMPDIR:-/tmp}/datasaver-fleet.XXXXXX; wiped at start, deleted
#                     at the end unless --keep)
#   --keep            keep the work dir
#   --no-deps         skip scripts/install-deps.sh
#   --no-build        do not build; fail if the release binaries are missing
#
# Quick try: bash bench/fleet.sh --agents 10 --runs 1
# Environment: DATASAVER_BIN_DIR=DIR uses the binaries in DIR (no cargo build).
# Exit status: 0 all targets met, 3 some target FAILed, 1 error.
set -euo pipefail

ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

agents=60
rows=30000
storage_opt=both
limit=""
runs=3
keep=0
deps=1
build=1
workdir=""
abspath() { if [[ "$1" = /* ]]; then echo "$1"; else echo "$ORIG_PWD/$1"; fi; }
while (($#)); do
    case "$1" in
        --agents | --rows | --storage | --limit | --runs | --workdir)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            opt=${1#--}
            val=$2
            shift
            ;;
        --agents=* | --rows=* | --storage=* | --limit=* | --runs=* | --workdir=*)
            opt=${1%%=*}
            opt=${opt#--}
            val=${1#*=}
            ;;
        --keep) opt=keep val=1 ;;
        --no-deps) opt=deps val=0 ;;
        --no-build) opt=build val=0 ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *)
            echo "unknown option: $1 (try --help)" >&2
            exit 2
            ;;
    esac
    case "$opt" in
        agents) agents=$val ;;
        rows) rows=$val ;;
        storage) storage_opt=$val ;;
        limit) limit=$val ;;
        runs) runs=$val ;;
        workdir) workdir=$(abspath "$val") ;;
        keep) keep=$val ;;
        deps) deps=$val ;;
        build) build=$val ;;
    esac
    shift
done
positive() { [[ "$1" =~ ^[0-9]+$ ]] && (($1 >= 1)); }
if ! positive "$agents" || ((agents > 999)); then die "--agents must be an integer from 1 to 999"; fi
positive "$rows" || die "--rows must be a positive integer"
positive "$runs" || die "--runs must be a positive integer"
[[ -z "$limit" ]] || positive "$limit" || die "--limit must be a positive integer"
case "$storage_opt" in
    local | s3) STORAGES=("$storage_opt") ;;
    both) STORAGES=(local s3) ;;
    *) die "--storage must be local, s3 or both" ;;
esac
LIMIT=${limit:-4} # the coordinator's default when DATASAVER_MAX_CONCURRENT_BACKUPS is unset

# Targets = agent names = database names: f01..f60 (at least two digits).
width=${#agents}
((width >= 2)) || width=2
TARGETS=()
for ((i = 1; i <= agents; i++)); do
    TARGETS+=("$(printf 'f%0*d' "$width" "$i")")
done

# ------------------------------------------------------------------ deps, binaries
if ((deps)); then
    step "Checking dependencies (scripts/install-deps.sh)"
    bash scripts/install-deps.sh
fi
command -v zstd >/dev/null || die "zstd not found (scripts/install-deps.sh installs it)"
command -v python3 >/dev/null || die "python3 not found"
if ((build)) && [[ -z "${DATASAVER_BIN_DIR:-}" ]]; then
    step "Building release binaries (cargo build --release --bins)"
    cargo build --release --bins
fi
ds_find_bins release || die "datasaver binaries missing in $DS_BIN_DIR"
info "binaries: $DS_BIN_DIR"

# ------------------------------------------------------------------ work dir
ds_prepare_workdir "$workdir" .datasaver-fleet-bench "$keep"

# Processes started here run as direct children of this shell and are stopped
# through ds_stop_children (which checks that each PID is still our child), not
# through one ds_stop_pid cleanup per PID: a run starts and stops N agents K
# times per storage, and with pid_max 32768 stale PIDs would soon be reused.
AGENT_PIDS=()
COORD_PID=""
S3_PID=""
BURST_PIDS=()
stop_started() {
    ds_stop_children "dsctl backup" 5 "${BURST_PIDS[@]}"
    ds_stop_children agents 15 "${AGENT_PIDS[@]}"
    ds_stop_children coordinator 15 ${COORD_PID:+"$COORD_PID"}
    ds_stop_children s3s-fs 5 ${S3_PID:+"$S3_PID"}
    BURST_PIDS=() AGENT_PIDS=() COORD_PID="" S3_PID=""
}

# ------------------------------------------------------------------ Postgres + data
step "Starting a throwaway PostgreSQL 15 cluster"
PWFILE="$WORK/db-password"
(
    umask 077
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$PWFILE"
)
ds_pg_init fleet "$PWFILE"
# Registered after ds_pg_init/ds_pg_start's cleanups, so it runs before them:
# agents go before the database they dump.
max_conn=$((agents * 2 + 20))
ds_pg_start "$WORK/postgres.log" -c max_connections="$max_conn" -c shared_buffers=256MB \
    -c max_wal_size=4GB -c checkpoint_timeout=1h -c autovacuum=off
ds_register_cleanup stop_started
info "postgres pid $DS_PG_PID on 127.0.0.1:$DS_PG_PORT, max_connections $max_conn"

step "Creating $agents databases of $rows rows each (md5 text and random numbers)"
gen_start=$(ds_now)
printf 'CREATE DATABASE %s;\n' "${TARGETS[@]}" | ds_psql postgres >/dev/null
cat >"$WORK/gen.sql" <<'SQL'
CREATE TABLE items (
    id         bigint PRIMARY KEY,
    code       text NOT NULL,
    note       text NOT NULL,
    qty        integer NOT NULL,
    price      numeric(12, 2) NOT NULL,
    score      double precision NOT NULL,
    created_at timestamptz NOT NULL
);
INSERT INTO items
SELECT g, md5(random()::text), md5(g::text || random()::text) || md5(random()::text),
       (random() * 100000)::int, round((random() * 10000)::numeric, 2), random(),
       timestamptz '2024-01-01 00:00:00+00' + random() * interval '700 days'
FROM generate_series(1, :rows) g;
VACUUM (FREEZE, ANALYZE) items;
SQL
# Two sessions for two cores.
printf '%s\n' "${TARGETS[@]}" |
    xargs -P 2 -I '{}' "$DS_PG_BIN_DIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$DS_PG_HOST" \
        -p "$DS_PG_PORT" -U postgres -d '{}' -v rows="$rows" -f "$WORK/gen.sql" >"$WORK/gen.log" 2>&1 ||
    {
        cat "$WORK/gen.log" >&2
        die "data generation failed"
    }
ds_psql postgres -c CHECKPOINT
DB_BYTES=$(ds_psql_val "${TARGETS[0]}" "SELECT pg_database_size(current_database())")
DATA_BYTES=$(ds_psql_val "${TARGETS[0]}" "SELECT pg_table_size('items')")
info "generated in $(ds_elapsed "$gen_start") s; each database: table data $((DATA_BYTES / 1024)) KiB, database $((DB_BYTES / 1024)) KiB"

# ------------------------------------------------------------------ certificates
step "Certificates: CA, coordinator, operator and $agents agents"
ds_certs "$WORK/certs" "${TARGETS[0]}" "${TARGETS[0]}" >/dev/null
for t in "${TARGETS[@]:1}"; do
    "$DS_DSCTL" certs issue --ca "$DS_CERTS" --agent "$t" --target "$t" --out "$DS_CERTS/agent" >/dev/null
    [[ -s "$DS_CERTS/agent/$t.crt" && -s "$DS_CERTS/agent/$t.key" ]] ||
        die "dsctl certs issue did not create $DS_CERTS/agent/$t.crt/.key"
done
info "in $DS_CERTS"

# ------------------------------------------------------------------ helpers
# median X...: the median, or nothing without arguments.
median() {
    (($#)) || return 0
    python3 -c 'import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"
}
mib() { awk -v k="$1" 'BEGIN { if (k == "") print "-"; else printf "%.1f", k / 1024 }'; }

# S3: one s3s-fs for the whole script, a new bucket per run.
start_s3() {
    [[ -z "$S3_PID" ]] || return 0
    S3FS=$(bash tests/install-s3-server.sh)
    mkdir -p "$WORK/s3"
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
    local ok=0
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; then
            ok=1
            break
        fi
        ds_alive "$S3_PID" || break
        sleep 0.1
    done
    if ((!ok)); then
        ds_tail_log "$WORK/s3s-fs.log"
        die "s3s-fs did not listen on 127.0.0.1:$S3_PORT"
    fi
    info "s3s-fs pid $S3_PID on 127.0.0.1:$S3_PORT (buckets under $WORK/s3)"
}

# start_coordinator DIR STORAGE RUN: like ds_start_coordinator (same settings),
# without a per-PID cleanup.  Sets COORD_PID, DS_COORDINATOR_URL, DS_COORDINATOR_LOG.
start_coordinator() {
    local dir=$1 storage=$2 run=$3
    local env_args=(-u DATASAVER_MAX_CONCURRENT_BACKUPS)
    [[ -z "$limit" ]] || env_args+=("DATASAVER_MAX_CONCURRENT_BACKUPS=$limit")
    if [[ "$storage" == s3 ]]; then
        local bucket="fleet-r$run"
        mkdir -p "$WORK/s3/$bucket"
        env_args+=(DATASAVER_STORAGE_BACKEND=s3 DATASAVER_S3_BUCKET="$bucket"
            DATASAVER_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" DATASAVER_S3_FORCE_PATH_STYLE=true
            DATASAVER_S3_ACCESS_KEY=benchkey DATASAVER_S3_SECRET_KEY_FILE="$S3_SECRET_FILE")
    fi
    local grpc http
    read -r grpc http < <(ds_free_ports 2)
    DS_COORDINATOR_URL="https://127.0.0.1:$grpc"
    DS_COORDINATOR_LOG="$dir/coordinator.log"
    env "${env_args[@]}" \
        DATASAVER_GRPC_LISTEN="127.0.0.1:$grpc" \
        DATASAVER_HTTP_LISTEN="127.0.0.1:$http" \
        DATASAVER_DATA_DIR="$dir/coordinator" \
        DATASAVER_TLS_CA="$DS_CERTS/ca.crt" \
        DATASAVER_TLS_CERT="$DS_CERTS/coordinator.crt" \
        DATASAVER_TLS_KEY="$DS_CERTS/coordinator.key" \
        "$DS_COORDINATOR" </dev/null >"$DS_COORDINATOR_LOG" 2>&1 &
    COORD_PID=$!
    ds_wait_coordinator "$COORD_PID" "$DS_COORDINATOR_LOG"
}

# start_agents DIR: one agent per target (environment as ds_start_agent), then
# wait until `dsctl --json agents` lists every target.  Sets AGENT_PIDS.
start_agents() {
    local dir=$1 t
    mkdir -p "$dir/agents"
    AGENT_PIDS=()
    for t in "${TARGETS[@]}"; do
        env DATASAVER_COORDINATOR_URL="$DS_COORDINATOR_URL" \
            DATASAVER_TARGET="$t" \
            DATASAVER_DB_HOST=127.0.0.1 \
            DATASAVER_DB_PORT="$DS_PG_PORT" \
            DATASAVER_DB_NAME="$t" \
            DATASAVER_DB_USER=postgres \
            DATASAVER_DB_PASSWORD_FILE="$PWFILE" \
            DATASAVER_PG_BIN_DIR="$DS_PG_BIN_DIR" \
            DATASAVER_TLS_CA="$DS_CERTS/agent/ca.crt" \
            DATASAVER_TLS_CERT="$DS_CERTS/agent/$t.crt" \
            DATASAVER_TLS_KEY="$DS_CERTS/agent/$t.key" \
            "$DS_AGENT" </dev/null >"$dir/agents/$t.log" 2>&1 &
        AGENT_PIDS+=($!)
    done
    local deadline=$((SECONDS + 60)) listed=0 i
    printf '%s\n' "${TARGETS[@]}" >"$dir/targets.txt"
    while :; do
        if ds_dsctl --json agents >"$dir/agents.json" 2>"$dir/agents.err"; then
            listed=$(python3 -c '
import json, sys
want = set(open(sys.argv[2]).read().split())
got = {t for a in json.load(open(sys.argv[1])) for t in a.get("targets", [])}
print(len(want & got))' "$dir/agents.json" "$dir/targets.txt")
            ((listed == agents)) && return 0
        fi
        for i in "${!AGENT_PIDS[@]}"; do
            if ! ds_alive "${AGENT_PIDS[$i]}"; then
                ds_tail_log "$dir/agents/${TARGETS[$i]}.log"
                die "agent ${TARGETS[$i]} exited (log: $dir/agents/${TARGETS[$i]}.log)"
            fi
        done
        if ! ds_alive "$COORD_PID"; then
            ds_tail_log "$DS_COORDINATOR_LOG"
            die "the coordinator exited (log: $DS_COORDINATOR_LOG)"
        fi
        if ((SECONDS >= deadline)); then
            cat "$dir/agents.err" >&2
            ds_tail_log "$DS_COORDINATOR_LOG"
            die "only $listed of $agents agents listed by 'dsctl agents' after 60 s"
        fi
        sleep 0.5
    done
}

# Results per "STORAGE,RUN" (and "baseline,RUN").
declare -A WALL OK_LIST OK_EXIT FAILED RUNNING C_IDLE C_HWM C_AFTER A_MED A_MAX STORED
BURST_TIMEOUT=$((300 + agents * 10))

# one_run STORAGE RUN: a coordinator, N agents, one burst of N backups, measurements.
one_run() {
    local storage=$1 run=$2 key="$1,$2"
    local dir="$WORK/$storage/r$run"
    mkdir -p "$dir/coordinator" "$dir/dsctl"
    step "$storage, run $run/$runs: coordinator + $agents agents"
    local up_start
    up_start=$(ds_now)
    start_coordinator "$dir" "$storage" "$run"
    start_agents "$dir"
    info "coordinator pid $COORD_PID, $agents agents listed after $(ds_elapsed "$up_start") s"
    sleep 1 # let start-up settle before the idle reading
    C_IDLE[$key]=$(ds_vm_rss_kib "$COORD_PID")

    step "$storage, run $run/$runs: $agents x dsctl backup, all at once"
    local dsctl_cmd=(timeout "$BURST_TIMEOUT" env DATASAVER_COORDINATOR_URL="$DS_COORDINATOR_URL"
        DATASAVER_TLS_CA="$DS_CERTS/ca.crt" DATASAVER_TLS_CERT="$DS_CERTS/operator.crt"
        DATASAVER_TLS_KEY="$DS_CERTS/operator.key" "$DS_DSCTL")
    local t start i rc ok_exit=0
    BURST_PIDS=()
    start=$(ds_now)
    for t in "${TARGETS[@]}"; do
        "${dsctl_cmd[@]}" --json backup "$t" --label "fleet-$storage-r$run" \
            </dev/null >"$dir/dsctl/$t.json" 2>"$dir/dsctl/$t.err" &
        BURST_PIDS+=($!)
    done
    for i in "${!BURST_PIDS[@]}"; do
        rc=0
        wait "${BURST_PIDS[$i]}" || rc=$?
        if ((rc == 0)); then
            ok_exit=$((ok_exit + 1))
        else
            echo "$rc" >"$dir/dsctl/${TARGETS[$i]}.rc"
        fi
    done
    WALL[$key]=$(ds_elapsed "$start")
    local burst_end=$SECONDS
    BURST_PIDS=()
    C_HWM[$key]=$(ds_vm_hwm_kib "$COORD_PID")
    local pid hwm=()
    for pid in "${AGENT_PIDS[@]}"; do
        hwm+=("$(ds_vm_hwm_kib "$pid")")
    done
    OK_EXIT[$key]=$ok_exit
    info "last completion after ${WALL[$key]} s; dsctl exit 0: $ok_exit/$agents"
    if ((ok_exit < agents)); then
        for t in "${TARGETS[@]}"; do
            [[ -e "$dir/dsctl/$t.rc" ]] || continue
            warn "dsctl backup $t exited $(<"$dir/dsctl/$t.rc"): $(tail -n 2 "$dir/dsctl/$t.err" | tr '\n' ' ')"
        done
    fi

    # Completed backups in the catalog, the most running at once, stored bytes.
    local listing
    if ds_dsctl --json list >"$dir/list.json" 2>"$dir/list.err" &&
        listing=$(python3 - "$dir/list.json" "$dir/targets.txt" "fleet-$storage-r$run" <<'PY'
import json, sys
from datetime import datetime
backups = json.load(open(sys.argv[1]))
want = set(open(sys.argv[2]).read().split())
ours = [b for b in backups if b.get("target") in want and b.get("label") == sys.argv[3]]
done = [b for b in ours if b.get("status") == "completed"]
events = []
for b in ours:
    if b.get("created_at") and b.get("finished_at"):
        p = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
        events += [(p(b["created_at"]), 1), (p(b["finished_at"]), -1)]
running = most = 0
for _, d in sorted(events, key=lambda e: (e[0], e[1])):
    running += d
    most = max(most, running)
print(len({b["target"] for b in done}), len(ours) - len(done), most,
      sum(b.get("stored_bytes") or 0 for b in done))
PY
        ); then
        local n_ok n_other most stored
        read -r n_ok n_other most stored <<<"$listing"
        OK_LIST[$key]=$n_ok FAILED[$key]=$n_other RUNNING[$key]=$most STORED[$key]=$stored
    else
        warn "dsctl --json list failed: $(head -c 300 "$dir/list.err")"
        OK_LIST[$key]=0 FAILED[$key]=- RUNNING[$key]=- STORED[$key]=0
    fi
    info "completed in 'dsctl list': ${OK_LIST[$key]}/$agents (other: ${FAILED[$key]}), most running at once: ${RUNNING[$key]}"

    local wait_s=$((burst_end + 10 - SECONDS))
    ((wait_s <= 0)) || sleep "$wait_s"
    C_AFTER[$key]=$(ds_vm_rss_kib "$COORD_PID")
    local got=()
    for pid in "${hwm[@]}"; do [[ -z "$pid" ]] || got+=("$pid"); done
    A_MED[$key]="" A_MAX[$key]=""
    if ((${#got[@]})); then
        A_MED[$key]=$(median "${got[@]}")
        A_MAX[$key]=$(printf '%s\n' "${got[@]}" | sort -n | tail -n 1)
    fi
    ((${#got[@]} == agents)) || warn "$((agents - ${#got[@]})) agents had exited before their peak RSS could be read"
    info "coordinator: idle $(mib "${C_IDLE[$key]}") MiB, peak $(mib "${C_HWM[$key]}") MiB, 10 s after $(mib "${C_AFTER[$key]}") MiB; agents' peak: median $(mib "${A_MED[$key]}") MiB, max $(mib "${A_MAX[$key]}") MiB"

    ds_stop_children agents 15 "${AGENT_PIDS[@]}"
    AGENT_PIDS=()
    ds_stop_children coordinator 15 "$COORD_PID"
    COORD_PID=""
}

# ------------------------------------------------------------------ baseline
BASE_WALL=()
BASE_BYTES=0
step "Baseline: pg_dump -Fc -Z0 DB | zstd -3 > FILE, $LIMIT at a time (xargs -P $LIMIT), $runs runs"
for ((run = 1; run <= runs; run++)); do
    bdir="$WORK/baseline/r$run"
    mkdir -p "$bdir"
    start=$(ds_now)
    # Connects like the agent: TCP and password.  ($0..$3 are bash -c's, not ours.)
    # shellcheck disable=SC2016
    printf '%s\n' "${TARGETS[@]}" |
        PGPASSWORD=$(<"$PWFILE") xargs -P "$LIMIT" -n 1 bash -c 'set -o pipefail
            "$0" -h 127.0.0.1 -p "$1" -U postgres -Fc -Z0 "$3" | zstd -q -3 -o "$2/$3.dump.zst"' \
            "$DS_PG_BIN_DIR/pg_dump" "$DS_PG_PORT" "$bdir" 2>"$bdir/stderr" ||
        {
            cat "$bdir/stderr" >&2
            die "baseline pg_dump | zstd failed"
        }
    BASE_WALL+=("$(ds_elapsed "$start")")
    BASE_BYTES=$(cat "$bdir"/*.dump.zst | wc -c)
    info "run $run: ${BASE_WALL[-1]} s, $((BASE_BYTES / 1024)) KiB in $agents files"
    rm -f "$bdir"/*.dump.zst
done
BASE_MED=$(median "${BASE_WALL[@]}")

# ------------------------------------------------------------------ datasaver runs
for storage in "${STORAGES[@]}"; do
    [[ "$storage" != s3 ]] || start_s3
    for ((run = 1; run <= runs; run++)); do
        one_run "$storage" "$run"
    done
done
stop_started

# ------------------------------------------------------------------ logs
# log_summary KIND PATTERN FILE...: the WARN/ERROR lines (tracing's level
# field; Postgres: ERROR/FATAL/PANIC) and panics in FILEs, grouped by message
# (numbers and hex ids masked so that repeats group together).
log_summary() {
    python3 - "$@" <<'PY'
import collections, re, sys
kind, files = sys.argv[1], sys.argv[3:]
level = re.compile(sys.argv[2])
counts, total = collections.Counter(), 0
for name in files:
    try:
        text = open(name, errors="replace").read()
    except OSError:
        continue
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = level.search(line)
        if not m:
            if "panicked" not in line:
                continue
            m = re.search(r"()(.*panicked.*)", line)
        total += 1
        msg = re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "#", m.group(2))
        counts[(m.group(1) + " " + msg).strip()[:160]] += 1
print(f"    {kind}: {total} lines" + (":" if total else ""))
for msg, n in counts.most_common(8):
    print(f"      {n:5d} x {msg}")
PY
}
TRACING_LEVEL='^\S+\s+(WARN|ERROR)\s+(.*)'

# ------------------------------------------------------------------ report
check() { awk -v a="$1" -v b="$3" "BEGIN { print (a $2 b) ? \"PASS\" : \"FAIL\" }"; }
{
    printf '\n==> Results: %s agents, %s databases of %s rows (table %s KiB, database %s KiB each), limit %s%s, %s run(s) per storage; %s\n' \
        "$agents" "$agents" "$rows" "$((DATA_BYTES / 1024))" "$((DB_BYTES / 1024))" "$LIMIT" \
        "$([[ -n "$limit" ]] && echo " (--limit)" || echo " (coordinator default)")" "$runs" "$(date -u +%FT%TZ)"
    printf '\n    baseline: pg_dump -Fc -Z0 | zstd -3 > file, %s at a time: %s s (runs: %s), %s KiB stored\n' \
        "$LIMIT" "$BASE_MED" "${BASE_WALL[*]}" "$((BASE_BYTES / 1024))"
    row() { printf '    %-7s %-4s %8s %9s %9s %8s %10s %10s %10s %10s %10s %10s\n' "$@"; }
    echo
    row "" "" "" "" "dsctl" "most" "coord" "coord" "coord" "agent" "agent" "stored"
    row storage run "wall s" completed "exit 0" running "idle MiB" "peak MiB" "+10s MiB" "peak med" "peak max" "KiB"
    declare -A MED
    for storage in "${STORAGES[@]}"; do
        walls=() hwms=() afters=() idles=() ameds=() amaxs=() tot_list=0 tot_exit=0
        for ((run = 1; run <= runs; run++)); do
            k="$storage,$run"
            row "$storage" "$run" "${WALL[$k]}" "${OK_LIST[$k]}/$agents" "${OK_EXIT[$k]}/$agents" \
                "${RUNNING[$k]}" "$(mib "${C_IDLE[$k]}")" "$(mib "${C_HWM[$k]}")" "$(mib "${C_AFTER[$k]}")" \
                "$(mib "${A_MED[$k]}")" "$(mib "${A_MAX[$k]}")" "$((STORED[$k] / 1024))"
            walls+=("${WALL[$k]}")
            tot_list=$((tot_list + OK_LIST[$k]))
            tot_exit=$((tot_exit + OK_EXIT[$k]))
            [[ -z "${C_HWM[$k]}" ]] || hwms+=("${C_HWM[$k]}")
            [[ -z "${C_AFTER[$k]}" ]] || afters+=("${C_AFTER[$k]}")
            [[ -z "${C_IDLE[$k]}" ]] || idles+=("${C_IDLE[$k]}")
            [[ -z "${A_MED[$k]:-}" ]] || ameds+=("${A_MED[$k]}")
            [[ -z "${A_MAX[$k]:-}" ]] || amaxs+=("${A_MAX[$k]}")
        done
        MED[$storage,wall]=$(median "${walls[@]}")
        MED[$storage,hwm]=$(median "${hwms[@]}")
        MED[$storage,amax]=$(median "${amaxs[@]}")
        MED[$storage,list]=$tot_list
        MED[$storage,exit]=$tot_exit
        if ((runs > 1)); then
            row "$storage" med "${MED[$storage,wall]}" "" "" "" \
                "$(mib "$(median "${idles[@]}")")" "$(mib "${MED[$storage,hwm]}")" \
                "$(mib "$(median "${afters[@]}")")" \
                "$(mib "$(median "${ameds[@]}")")" "$(mib "${MED[$storage,amax]}")" ""
        fi
    done
    printf '\n    datasaver wall time / baseline (%s s):' "$BASE_MED"
    for storage in "${STORAGES[@]}"; do
        printf '  %s %s x' "$storage" "$(awk -v d="${MED[$storage,wall]}" -v b="$BASE_MED" 'BEGIN { printf "%.2f", d / b }')"
    done
    printf '\n\n    WARN/ERROR lines in the logs (all runs; numbers in messages masked):\n'
    for storage in "${STORAGES[@]}"; do
        log_summary "coordinator logs ($storage)" "$TRACING_LEVEL" "$WORK/$storage"/r*/coordinator.log
        log_summary "agent logs ($storage)" "$TRACING_LEVEL" "$WORK/$storage"/r*/agents/*.log
    done
    log_summary "postgres log (ERROR/FATAL/PANIC)" '()((ERROR|FATAL|PANIC):.*)' "$WORK/postgres.log"

    printf '\n    %-46s %-24s %s\n' "target" "measured" "result"
    trow() { printf '    %-46s %-24s %s\n' "$1" "$2" "$3"; }
    total=$((agents * runs))
    for storage in "${STORAGES[@]}"; do
        if [[ "$storage" == s3 ]]; then c_lim=256; else c_lim=128; fi
        ok=FAIL
        ((MED[$storage,list] == total && MED[$storage,exit] == total)) && ok=PASS
        trow "every backup completes ($storage)" "list ${MED[$storage,list]}/$total, exit 0 ${MED[$storage,exit]}/$total" "$ok"
        if [[ -n "${MED[$storage,hwm]}" ]]; then
            trow "coordinator peak RSS < $c_lim MiB ($storage)" "$(mib "${MED[$storage,hwm]}") MiB" \
                "$(check "${MED[$storage,hwm]}" '<' $((c_lim * 1024)))"
        else
            trow "coordinator peak RSS < $c_lim MiB ($storage)" "-" FAIL
        fi
        if [[ -n "${MED[$storage,amax]}" ]]; then
            trow "agent peak RSS < 64 MiB ($storage)" "$(mib "${MED[$storage,amax]}") MiB (largest agent)" \
                "$(check "${MED[$storage,amax]}" '<' 65536)"
        else
            trow "agent peak RSS < 64 MiB ($storage)" "-" FAIL
        fi
    done
} | tee "$WORK/results.txt"

if grep -q ' FAIL$' "$WORK/results.txt"; then
    exit 3
fi
