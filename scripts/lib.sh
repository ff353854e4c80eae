# shellcheck shell=bash
# Shared helpers for datasaver's scripts (quickstart, bench, test).
# Source it; do not run it.  Requires bash >= 4.
#
# What it gives:
#   step / info / warn / die         uniform output ("==> ..." for steps)
#   ds_register_cleanup CMD...       run CMD at exit (LIFO), also on error and Ctrl-C
#   ds_stop_pid PID NAME [SIG] [T]   stop a process this script started, by its PID
#   ds_stop_children NAME T PID...   stop many of this shell's children at once
#   ds_free_ports N                  N distinct free loopback TCP ports
#   ds_prepare_workdir DIR MARKER K  a work dir (WORK), wiped only if ours, kept if K=1
#   ds_wait_coordinator PID LOG      until the coordinator answers dsctl
#   ds_pg_*                          a throwaway PostgreSQL cluster (initdb, start, stop)
#   ds_now / ds_elapsed START        wall-clock timing
#   ds_median X...                   the median of some numbers

if [[ -n "${_DS_LIB_LOADED:-}" ]]; then
    return 0
fi
_DS_LIB_LOADED=1

DS_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DS_REPO_ROOT

# ---------------------------------------------------------------- output

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- cleanup
#
# Cleanup actions run in reverse order of registration when the script exits
# for any reason (success, error under `set -e`, Ctrl-C, SIGTERM).

_DS_CLEANUP=()
_DS_CLEANING=0

ds_register_cleanup() {
    # Store the command as one properly quoted string.
    local q
    printf -v q '%q ' "$@"
    _DS_CLEANUP+=("$q")
}

_ds_run_cleanup() {
    local rc=$?
    if ((_DS_CLEANING)); then
        return
    fi
    _DS_CLEANING=1
    set +e
    local i
    for ((i = ${#_DS_CLEANUP[@]} - 1; i >= 0; i--)); do
        eval "${_DS_CLEANUP[$i]}"
    done
    _DS_CLEANUP=()
    return "$rc"
}

_ds_on_signal() {
    local sig=$1
    printf '\nInterrupted (%s), cleaning up...\n' "$sig" >&2
    # The EXIT trap does the work; exit with the conventional status.
    case "$sig" in
        INT) exit 130 ;;
        TERM) exit 143 ;;
        *) exit 1 ;;
    esac
}

trap _ds_run_cleanup EXIT
trap '_ds_on_signal INT' INT
trap '_ds_on_signal TERM' TERM
trap '_ds_on_signal HUP' HUP

# ---------------------------------------------------------------- processes

# ds_stop_pid PID NAME [SIGNAL] [TIMEOUT_SECONDS]
# Sends SIGNAL (default TERM) to PID, waits up to TIMEOUT (default 15 s), then
# sends KILL.  Only ever called with PIDs this script started itself.
ds_stop_pid() {
    local pid=$1 name=$2 sig=${3:-TERM} timeout=${4:-15}
    [[ -n "$pid" ]] || return 0
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || true
        return 0
    fi
    info "stopping $name (pid $pid)"
    kill "-$sig" "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            warn "$name (pid $pid) did not stop after ${timeout}s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    wait "$pid" 2>/dev/null || true
    return 0
}

# ds_alive PID: true while the process runs (and is not a zombie).
ds_alive() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 1
    local state
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
    [[ "$state" != Z ]]
}

# ds_tail_log FILE [LINES]: show the end of a log file, indented.
ds_tail_log() {
    local f=$1 n=${2:-30}
    if [[ -s "$f" ]]; then
        printf -- '---- last %s lines of %s ----\n' "$n" "$f" >&2
        tail -n "$n" "$f" | sed 's/^/    /' >&2
        printf -- '----\n' >&2
    fi
}

# ds_free_ports N: print N distinct currently-free TCP ports on 127.0.0.1.
ds_free_ports() {
    local n=${1:-1}
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$n" <<'PY'
import socket, sys
n = int(sys.argv[1])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
    else
        # Pure bash fallback: random high ports that nobody answers on.
        local ports=() p
        while ((${#ports[@]} < n)); do
            p=$((20000 + RANDOM % 30000))
            [[ " ${ports[*]} " == *" $p "* ]] && continue
            if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
                ports+=("$p")
            fi
        done
        echo "${ports[*]}"
    fi
}

# ds_is_child PID: true while PID is a live (not zombie) child of this shell.
# pid_max can be as small as 32768, so a PID is soon reused once its process
# exited: checking the parent first means never signalling a stranger.
ds_is_child() {
    local stat rest state ppid
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    read -r state ppid _ <<<"$rest"
    [[ "$state" != Z && "$ppid" == "$$" ]]
}

# ds_stop_children NAME TIMEOUT PID...: stop many processes this shell started,
# all at once: TERM to each PID still a child of this shell (ds_is_child), wait
# up to TIMEOUT seconds for all of them, KILL the rest, then reap them.
ds_stop_children() {
    local name=$1 timeout=$2
    shift 2
    local pid live=() left=()
    for pid in "$@"; do
        if ds_is_child "$pid" && kill -TERM "$pid" 2>/dev/null; then
            live+=("$pid")
        fi
    done
    ((${#live[@]} == 0)) || info "stopping ${#live[@]} $name"
    local deadline=$((SECONDS + timeout))
    while ((${#live[@]})); do
        left=()
        for pid in "${live[@]}"; do
            if ds_is_child "$pid"; then left+=("$pid"); fi
        done
        live=("${left[@]}")
        ((${#live[@]})) || break
        if ((SECONDS >= deadline)); then
            warn "${#live[@]} $name did not stop after ${timeout}s; sending KILL"
            for pid in "${live[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
            break
        fi
        sleep 0.1
    done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
    return 0
}

# ds_prepare_workdir DIR MARKER KEEP: make DIR (default: a new temp dir) the
# work dir and set WORK to its absolute path. A DIR that exists is wiped only
# if an earlier run of the same script made it (MARKER file) or it is empty;
# anything else is refused. Removed at exit unless KEEP is 1.
ds_prepare_workdir() {
    local dir=$1 marker=$2 keep=$3
    if [[ -z "$dir" ]]; then
        dir=$(mktemp -d "${TMPDIR:-/tmp}/datasaver-${marker#.datasaver-}.XXXXXX")
    fi
    step "Preparing work dir $dir"
    if [[ -e "$dir" ]]; then
        if [[ -e "$dir/$marker" ]] || [[ -d "$dir" && -z "$(ls -A "$dir")" ]]; then
            rm -rf "$dir"
        else
            die "$dir exists and was not made by this script; refusing to wipe it"
        fi
    fi
    mkdir -p "$dir"
    WORK=$(cd "$dir" && pwd)
    touch "$WORK/$marker"
    if ((keep)); then
        ds_register_cleanup info "work dir kept: $WORK"
    else
        ds_register_cleanup rm -rf "$WORK"
    fi
}

# ---------------------------------------------------------------- timing

ds_now() { date +%s.%N; }
# ds_elapsed START: seconds since START (from ds_now), 3 decimals.
ds_elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.3f", e - s }'; }
# ds_median X...: the median of the numbers X: for an odd count the middle one
# exactly as given, for an even count the mean of the middle two (3 decimals);
# nothing without arguments.
ds_median() {
    (($#)) || return 0
    awk 'BEGIN {
        n = ARGC - 1
        for (i = 1; i <= n; i++) v[i] = ARGV[i]
        for (i = 2; i <= n; i++) {
            x = v[i]
            for (j = i - 1; j >= 1 && v[j] + 0 > x + 0; j--) v[j + 1] = v[j]
            v[j + 1] = x
        }
        if (n % 2) print v[(n + 1) / 2]
        else printf "%.3f\n", (v[n / 2] + v[n / 2 + 1]) / 2
    }' "$@"
}

# ds_vm_hwm_kib PID: peak resident set size (VmHWM) in KiB, or empty.
ds_vm_hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }
# ds_vm_rss_kib PID: current resident set size (VmRSS) in KiB, or empty.
ds_vm_rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }

# ---------------------------------------------------------------- binaries

# ds_find_bins PROFILE: sets DS_BIN_DIR, DS_COORDINATOR, DS_AGENT, DS_DSCTL.
# DATASAVER_BIN_DIR, when set, names the directory instead (and the scripts
# then skip cargo build).
ds_find_bins() {
    local profile=${1:-release}
    local target_dir=${CARGO_TARGET_DIR:-$DS_REPO_ROOT/target}
    DS_BIN_DIR=${DATASAVER_BIN_DIR:-$target_dir/$profile}
    DS_COORDINATOR="$DS_BIN_DIR/datasaver-coordinator"
    DS_AGENT="$DS_BIN_DIR/datasaver-agent"
    DS_DSCTL="$DS_BIN_DIR/dsctl"
    local b
    for b in "$DS_COORDINATOR" "$DS_AGENT" "$DS_DSCTL"; do
        [[ -x "$b" ]] || return 1
    done
    return 0
}

# ---------------------------------------------------------------- PostgreSQL
#
# A throwaway cluster: data dir and Unix socket under a short /tmp directory
# (socket paths must stay under 107 bytes), listening on 127.0.0.1 only, on a
# free port.  Local (socket) connections are trusted, TCP connections need the
# generated password (scram-sha-256), which is what the agent uses.
#
# As root, initdb and postgres refuse to run, so they run as the `postgres`
# user (setpriv, which execs without forking, so $! is the postmaster's PID).

DS_PG_BIN_DIR=${DATASAVER_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}

# ds_pg_as_owner CMD...: run CMD as the cluster owner.
ds_pg_as_owner() {
    if ((EUID == 0)); then
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        "$@"
    fi
}

# ds_pg_init NAME PASSWORD_FILE
# Creates a cluster in a new /tmp directory.  Sets DS_PG_ROOT (the /tmp dir,
# also the socket dir), DS_PG_DATA, DS_PG_PORT, DS_PG_HOST (socket dir).
# PASSWORD_FILE: an existing file holding the password for the `postgres` role.
ds_pg_init() {
    local name=$1 pwfile=$2
    [[ -x "$DS_PG_BIN_DIR/initdb" ]] ||
        die "no initdb in $DS_PG_BIN_DIR (install postgresql-15: scripts/install-deps.sh)"
    if ((EUID == 0)) && ! getent passwd postgres >/dev/null; then
        die "running as root but there is no 'postgres' user to run the server as"
    fi
    DS_PG_ROOT=$(mktemp -d "/tmp/ds-${name}.XXXXXX")
    ds_register_cleanup rm -rf "$DS_PG_ROOT"
    DS_PG_DATA="$DS_PG_ROOT/data"
    DS_PG_HOST="$DS_PG_ROOT"
    # initdb reads the password file as the cluster owner: give it a private copy.
    install -m 0600 "$pwfile" "$DS_PG_ROOT/pw"
    if ((EUID == 0)); then
        chown -R postgres:postgres "$DS_PG_ROOT"
    fi
    chmod 0700 "$DS_PG_ROOT"
    (
        cd "$DS_PG_ROOT" || exit 1
        ds_pg_as_owner "$DS_PG_BIN_DIR/initdb" --no-sync -D "$DS_PG_DATA" -U postgres \
            --auth-local=trust --auth-host=scram-sha-256 --pwfile="$DS_PG_ROOT/pw" \
            --encoding=UTF8 --locale=C.UTF-8 >"$DS_PG_ROOT/initdb.log" 2>&1
    ) || {
        cat "$DS_PG_ROOT/initdb.log" >&2
        die "initdb failed"
    }
    rm -f "$DS_PG_ROOT/pw"
}

# ds_pg_start LOGFILE [postgres -c options...]
# Starts the postmaster in the background on a free port; sets DS_PG_PID, DS_PG_PORT.
ds_pg_start() {
    local log=$1
    shift
    DS_PG_PORT=$(ds_free_ports 1)
    # Our shell opens the log file, so it can live anywhere we can write.
    (
        cd "$DS_PG_ROOT" || exit 1
        exec </dev/null
        if ((EUID == 0)); then
            exec setpriv --reuid=postgres --regid=postgres --init-groups -- \
                "$DS_PG_BIN_DIR/postgres" -D "$DS_PG_DATA" -p "$DS_PG_PORT" \
                -c listen_addresses=127.0.0.1 -c unix_socket_directories="$DS_PG_HOST" \
                -c fsync=off -c full_page_writes=off -c synchronous_commit=off "$@"
        else
            exec "$DS_PG_BIN_DIR/postgres" -D "$DS_PG_DATA" -p "$DS_PG_PORT" \
                -c listen_addresses=127.0.0.1 -c unix_socket_directories="$DS_PG_HOST" \
                -c fsync=off -c full_page_writes=off -c synchronous_commit=off "$@"
        fi
    ) >>"$log" 2>&1 &
    DS_PG_PID=$!
    # Fast shutdown (SIGINT) when the script exits.
    ds_register_cleanup ds_stop_pid "$DS_PG_PID" postgres INT 30
    local deadline=$((SECONDS + 30))
    until "$DS_PG_BIN_DIR/pg_isready" -q -h "$DS_PG_HOST" -p "$DS_PG_PORT" -U postgres; do
        if ! ds_alive "$DS_PG_PID"; then
            ds_tail_log "$log"
            die "postgres exited during start-up"
        fi
        if ((SECONDS >= deadline)); then
            ds_tail_log "$log"
            die "postgres did not become ready within 30 s"
        fi
        sleep 0.1
    done
}

# ds_psql DB [psql args...]: psql over the Unix socket as `postgres`, stop on error.
ds_psql() {
    local db=$1
    shift
    "$DS_PG_BIN_DIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$DS_PG_HOST" -p "$DS_PG_PORT" -U postgres -d "$db" "$@"
}

# ds_psql_val DB SQL: print a single value (unaligned, tuples only).
ds_psql_val() {
    local db=$1
    shift
    ds_psql "$db" -At -c "$*"
}

# ---------------------------------------------------------------- datasaver
#
# Start a local fleet: CA + certificates, one coordinator (local storage) and
# one agent for one target.  Requires ds_find_bins and a running cluster
# (ds_pg_start).  Sets:
#   DS_CERTS DS_GRPC_PORT DS_HTTP_PORT DS_COORDINATOR_URL
#   DS_COORDINATOR_PID DS_COORDINATOR_LOG DS_AGENT_PID DS_AGENT_LOG

# ds_show CMD...: echo a command the way a user would type it.
ds_show() { printf '    $ %s\n' "$*"; }

# ds_dsctl ARGS...: dsctl as the operator, against the local coordinator.
ds_dsctl() {
    env DATASAVER_COORDINATOR_URL="${DS_COORDINATOR_URL:-}" \
        DATASAVER_TLS_CA="$DS_CERTS/ca.crt" \
        DATASAVER_TLS_CERT="$DS_CERTS/operator.crt" \
        DATASAVER_TLS_KEY="$DS_CERTS/operator.key" \
        "$DS_DSCTL" "$@"
}

# ds_certs DIR AGENT_NAME TARGET: fleet CA, coordinator, operator and agent certificates
# (the agent's certificate names the target it may serve).
ds_certs() {
    DS_CERTS=$1
    local agent=$2 target=$3 f
    ds_show dsctl certs init --out "$DS_CERTS"
    "$DS_DSCTL" certs init --out "$DS_CERTS"
    ds_show dsctl certs issue --ca "$DS_CERTS" --agent "$agent" --target "$target" --out "$DS_CERTS/agent"
    "$DS_DSCTL" certs issue --ca "$DS_CERTS" --agent "$agent" --target "$target" --out "$DS_CERTS/agent"
    for f in ca.crt ca.key coordinator.crt coordinator.key operator.crt operator.key \
        "agent/$agent.crt" "agent/$agent.key" agent/ca.crt; do
        [[ -s "$DS_CERTS/$f" ]] || die "dsctl certs did not create $DS_CERTS/$f"
    done
}

# ds_start_coordinator DATA_DIR LOG [VAR=VALUE...]
ds_start_coordinator() {
    local data_dir=$1 log=$2
    shift 2
    read -r DS_GRPC_PORT DS_HTTP_PORT < <(ds_free_ports 2)
    DS_COORDINATOR_URL="https://127.0.0.1:$DS_GRPC_PORT"
    DS_COORDINATOR_LOG=$log
    env DATASAVER_GRPC_LISTEN="127.0.0.1:$DS_GRPC_PORT" \
        DATASAVER_HTTP_LISTEN="127.0.0.1:$DS_HTTP_PORT" \
        DATASAVER_DATA_DIR="$data_dir" \
        DATASAVER_TLS_CA="$DS_CERTS/ca.crt" \
        DATASAVER_TLS_CERT="$DS_CERTS/coordinator.crt" \
        DATASAVER_TLS_KEY="$DS_CERTS/coordinator.key" \
        "$@" "$DS_COORDINATOR" </dev/null >"$log" 2>&1 &
    DS_COORDINATOR_PID=$!
    ds_register_cleanup ds_stop_pid "$DS_COORDINATOR_PID" coordinator TERM 15
    ds_wait_coordinator "$DS_COORDINATOR_PID" "$log"
}

# ds_wait_coordinator PID LOG: wait until the coordinator answers an operator
# call over mTLS (a bare TCP probe would only make it log a failed TLS
# handshake); die with its log if it exits or does not answer within 30 s.
ds_wait_coordinator() {
    local pid=$1 log=$2
    local deadline=$((SECONDS + 30)) out
    until out=$(ds_dsctl agents 2>&1); do
        if ! ds_alive "$pid"; then
            ds_tail_log "$log"
            die "the coordinator exited during start-up (log: $log)"
        fi
        if ((SECONDS >= deadline)); then
            printf '%s\n' "$out" | sed 's/^/    /' >&2
            ds_tail_log "$log"
            die "the coordinator does not answer 'dsctl agents' after 30 s (log: $log)"
        fi
        sleep 0.2
    done
}

# ds_start_agent AGENT_NAME TARGET DBNAME PASSWORD_FILE LOG [VAR=VALUE...]
ds_start_agent() {
    local agent=$1 target=$2 db=$3 pwfile=$4 log=$5
    shift 5
    DS_AGENT_LOG=$log
    env DATASAVER_COORDINATOR_URL="$DS_COORDINATOR_URL" \
        DATASAVER_TARGET="$target" \
        DATASAVER_DB_HOST=127.0.0.1 \
        DATASAVER_DB_PORT="$DS_PG_PORT" \
        DATASAVER_DB_NAME="$db" \
        DATASAVER_DB_USER=postgres \
        DATASAVER_DB_PASSWORD_FILE="$pwfile" \
        DATASAVER_PG_BIN_DIR="$DS_PG_BIN_DIR" \
        DATASAVER_TLS_CA="$DS_CERTS/agent/ca.crt" \
        DATASAVER_TLS_CERT="$DS_CERTS/agent/$agent.crt" \
        DATASAVER_TLS_KEY="$DS_CERTS/agent/$agent.key" \
        "$@" "$DS_AGENT" </dev/null >"$log" 2>&1 &
    DS_AGENT_PID=$!
    ds_register_cleanup ds_stop_pid "$DS_AGENT_PID" agent TERM 15
}

# ds_check_fleet_alive: die (with logs) if the coordinator or the agent exited.
ds_check_fleet_alive() {
    if [[ -n "${DS_COORDINATOR_PID:-}" ]] && ! ds_alive "$DS_COORDINATOR_PID"; then
        ds_tail_log "$DS_COORDINATOR_LOG"
        die "the coordinator exited (log: $DS_COORDINATOR_LOG)"
    fi
    if [[ -n "${DS_AGENT_PID:-}" ]] && ! ds_alive "$DS_AGENT_PID"; then
        ds_tail_log "$DS_AGENT_LOG"
        die "the agent exited (log: $DS_AGENT_LOG)"
    fi
}

# ds_wait_agent TARGET [TIMEOUT]: wait until `dsctl agents` lists TARGET.
# Leaves the last output in DS_AGENTS_OUT.
ds_wait_agent() {
    local target=$1 timeout=${2:-30}
    local deadline=$((SECONDS + timeout))
    while :; do
        if DS_AGENTS_OUT=$(ds_dsctl agents 2>&1) && grep -qw -- "$target" <<<"$DS_AGENTS_OUT"; then
            return 0
        fi
        ds_check_fleet_alive
        if ((SECONDS >= deadline)); then
            printf '%s\n' "$DS_AGENTS_OUT" | sed 's/^/    /' >&2
            ds_tail_log "$DS_AGENT_LOG"
            ds_tail_log "$DS_COORDINATOR_LOG"
            die "no agent for target '$target' in 'dsctl agents' after ${timeout} s"
        fi
        sleep 0.5
    done
}

# ds_fail_with_logs MESSAGE: show both logs' tails, then die.
ds_fail_with_logs() {
    ds_tail_log "${DS_AGENT_LOG:-}"
    ds_tail_log "${DS_COORDINATOR_LOG:-}"
    die "$*"
}
