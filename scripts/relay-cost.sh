#!/usr/bin/env bash
# What the agent costs per relayed MiB of a large non-ECDS (cut-through) response: CPU
# instructions (callgrind Ir; this VM has no hardware perf counters), syscalls and CPU time
# (perf stat tracepoints + task-clock), for SotW and Delta ADS.
#
#   scripts/relay-cost.sh            # prints a markdown table; artefacts in /tmp/relay-cost
#
# Set-up per run: scripts/relay_cost.py is the control plane (one pre-encoded ~15 MB CDS
# response of 68 000 clusters, then an identical one per ACK, up to K) and the Envoy-side client
# (CDS request with a node, ACKs each response, stops after K). The agent runs as a plaintext
# proxy between them on 127.0.0.1. Each (flavor, K) runs once under callgrind and once natively
# with perf stat attached; the table is the difference K=high minus K=low divided by the extra
# MiB relayed, so start-up, stream set-up and shutdown cancel out.
#
# Environment:
#   ECDS_AGENT_BIN            agent binary (default target/release/ecds-agent; waited for)
#   RELAY_COST_OUT            artefact directory (default /tmp/relay-cost, emptied first)
#   RELAY_COST_CLUSTERS       clusters per response (default 68000, ~14.1 MiB SotW)
#   RELAY_COST_LOW / _HIGH    responses in the two runs (default 1 and 5)
#   RELAY_COST_FLAVORS        default "sotw delta"
#   RELAY_COST_MODES          default "callgrind perf strace" (strace: K=high only, I/O sizes)
#   RELAY_COST_REPEAT         runs per case, the median is reported (default 3)
#   RELAY_COST_BIN_WAIT_S     how long to wait for the binary to appear (default 2400)
#   PYTHON                    python with grpcio (default .venv/bin/python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${ECDS_AGENT_BIN:-$ROOT/target/release/ecds-agent}
PY=${PYTHON:-$ROOT/.venv/bin/python}
HELPER=$ROOT/scripts/relay_cost.py
OUT=${RELAY_COST_OUT:-/tmp/relay-cost}
CLUSTERS=${RELAY_COST_CLUSTERS:-68000}
LOW=${RELAY_COST_LOW:-1}
HIGH=${RELAY_COST_HIGH:-5}
FLAVORS=${RELAY_COST_FLAVORS:-sotw delta}
MODES=${RELAY_COST_MODES:-callgrind perf strace}
REPEAT=${RELAY_COST_REPEAT:-3}
BIN_WAIT_S=${RELAY_COST_BIN_WAIT_S:-2400}

log() { printf '[relay-cost %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- every process started here is stopped on exit ------------------------------------
PIDS=()
stop_pid() {  # stop_pid PID [grace seconds]: TERM, bounded wait, then KILL
  local pid=$1 grace=${2:-10} i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid still alive after ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid" 5; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2 t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - t0 < limit)) || die "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

# ---- prerequisites -------------------------------------------------------------------
[[ -x $PY ]] || die "$PY missing: create the venv with 'make grpcio'"
"$PY" -c 'import grpc' 2>/dev/null || die "grpcio missing in $PY ('make grpcio')"
for tool in valgrind callgrind_annotate perf strace curl; do
  [[ " $MODES " != *" callgrind "* && $tool == valgrind* ]] && continue
  [[ " $MODES " != *" callgrind "* && $tool == callgrind_annotate ]] && continue
  [[ " $MODES " != *" perf "* && $tool == perf ]] && continue
  [[ " $MODES " != *" strace "* && $tool == strace ]] && continue
  command -v "$tool" >/dev/null || die "$tool not found"
done

binary_settled() {  # exists, runs, and has not changed for 5 s (a link may still be writing it)
  [[ -x $BIN ]] || return 1
  local a b
  a=$(stat -c '%s %Y' "$BIN") && sleep 5 && b=$(stat -c '%s %Y' "$BIN") && [[ $a == "$b" ]] &&
    "$BIN" --help >/dev/null 2>&1
}
if ! binary_settled; then
  log "waiting up to ${BIN_WAIT_S}s for $BIN"
  wait_for "$BIN_WAIT_S" "$BIN" binary_settled
fi
"$BIN" run --help | grep -q -- '--upstream' || die "$BIN run has no --upstream flag"

rm -rf "$OUT"
mkdir -p "$OUT"
PERF_EVENTS=raw_syscalls:sys_enter,task-clock
available=$(perf list tracepoint 2>/dev/null || true)
for call in read recvfrom readv recvmsg write writev sendto sendmsg epoll_wait epoll_pwait \
  epoll_pwait2 futex sched_yield mmap munmap madvise mremap brk; do
  grep -q "syscalls:sys_enter_$call\b" <<<"$available" && PERF_EVENTS+=,syscalls:sys_enter_$call
done

# ---- one run ---------------------------------------------------------------------------
run_case() {  # run_case FLAVOR K MODE REP
  local flavor=$1 k=$2 mode=$3 rep=$4
  local dir=$OUT/$flavor-k$k-$mode-$rep
  local ready_s=60 client_s=300 exit_s=30
  if [[ $mode == callgrind ]]; then ready_s=900 client_s=3600 exit_s=900; fi
  mkdir -p "$dir/cache"
  log "run $flavor K=$k $mode #$rep"

  "$PY" "$HELPER" server --port-file "$dir/cp.port" --clusters "$CLUSTERS" \
    --max-responses "$k" --done-file "$dir/done" >"$dir/cp.log" 2>&1 &
  local cp=$!
  PIDS+=("$cp")
  wait_for 120 "the control plane" test -s "$dir/cp.port"
  local up lp ap
  up=$(cat "$dir/cp.port")
  lp=$("$PY" "$HELPER" port)
  ap=$("$PY" "$HELPER" port)
  while [[ $ap == "$lp" ]]; do ap=$("$PY" "$HELPER" port); done
  printf 'listen %s\nupstream %s\nadmin %s\n' "$lp" "$up" "$ap" >"$dir/ports"

  local agent=("$BIN" run --listen "127.0.0.1:$lp" --upstream "http://127.0.0.1:$up"
    --admin "127.0.0.1:$ap" --cache-dir "$dir/cache" --shutdown-grace 1s)
  local apid
  case $mode in
    callgrind)
      RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/cg.%p.out" \
        --dump-instr=no --collect-jumps=no "${agent[@]}" >"$dir/agent.log" 2>&1 &
      apid=$! ;;
    perf)
      RUST_LOG=warn "${agent[@]}" >"$dir/agent.log" 2>&1 &
      apid=$! ;;
    strace)
      RUST_LOG=warn strace -f -yy -s 0 -o "$dir/strace.txt" \
        -e trace=read,recvfrom,readv,recvmsg,write,writev,sendto,sendmsg "${agent[@]}" \
        >"$dir/agent.log" 2>&1 &
      apid=$! ;;
  esac
  PIDS+=("$apid")
  wait_for "$ready_s" "the agent's /healthz/ready" curl -fsS -m 2 "http://127.0.0.1:$ap/healthz/ready"

  local perf_pid=
  if [[ $mode == perf ]]; then
    perf stat -x, -o "$dir/perf.csv" -e "$PERF_EVENTS" -p "$apid" 2>"$dir/perf.err" &
    perf_pid=$!
    PIDS+=("$perf_pid")
    sleep 1  # let perf attach to every thread before traffic starts
  fi

  if ! timeout "$((client_s + 30))" "$PY" "$HELPER" client --target "127.0.0.1:$lp" \
    --flavor "$flavor" --count "$k" --wait-file "$dir/done" --timeout "$client_s" \
    >"$dir/client.out" 2>"$dir/client.err"; then
    cat "$dir/client.err" >&2
    die "client failed ($flavor K=$k $mode); see $dir"
  fi
  log "  $(cat "$dir/client.out")"

  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do kill -0 "$perf_pid" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$perf_pid" 5
  fi
  # SIGTERM: the agent drains and exits, and callgrind writes its profile on the way out.
  # Under strace the agent is strace's child: signal it, and strace ends with it.
  if [[ $mode == strace ]]; then
    local child
    child=$(pgrep -P "$apid" | head -n1 || true)
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null || true
    local j
    for ((j = 0; j < exit_s * 10; j++)); do kill -0 "$apid" 2>/dev/null || break; sleep 0.1; done
  fi
  stop_pid "$apid" "$exit_s"
  stop_pid "$cp" 5
  PIDS=()
  if [[ $mode == callgrind ]]; then
    compgen -G "$dir/cg.*.out" >/dev/null || die "no callgrind profile in $dir"
  fi
}

t_start=$SECONDS
for flavor in $FLAVORS; do
  for mode in $MODES; do
    for ((rep = 1; rep <= REPEAT; rep++)); do
      for k in "$LOW" "$HIGH"; do
        [[ $mode == strace && $k != "$HIGH" ]] && continue
        run_case "$flavor" "$k" "$mode" "$rep"
      done
    done
  done
  # Where the instructions go: the marginal per-function cost (K=high minus K=low profile)
  # and the K=high profile itself, from the first repetition.
  cg_lo=$(compgen -G "$OUT/$flavor-k$LOW-callgrind-1/cg.*.out" | head -n1 || true)
  cg_hi=$(compgen -G "$OUT/$flavor-k$HIGH-callgrind-1/cg.*.out" | head -n1 || true)
  if [[ -n $cg_lo && -n $cg_hi ]]; then
    b_lo=$(awk '{print $4}' "$OUT/$flavor-k$LOW-callgrind-1/client.out")
    b_hi=$(awk '{print $4}' "$OUT/$flavor-k$HIGH-callgrind-1/client.out")
    mib=$(awk -v a="$b_hi" -v b="$b_lo" 'BEGIN {printf "%.3f", (a - b) / 1048576}')
    {
      echo "# $flavor ADS: marginal self cost per relayed MiB (K=$HIGH minus K=$LOW callgrind profiles)"
      "$PY" "$HELPER" topdiff --low "$cg_lo" --high "$cg_hi" --mib "$mib" --top 30
      echo
      echo "# $flavor ADS, K=$HIGH run, whole process: callgrind_annotate self cost (exclusive)"
      callgrind_annotate --inclusive=no "$cg_hi" | sed -n '/PROGRAM TOTALS/,$p' | sed -n '1,30p'
      echo
      echo "# $flavor ADS, K=$HIGH run, whole process: inclusive cost"
      callgrind_annotate --inclusive=yes "$cg_hi" | sed -n '/PROGRAM TOTALS/,$p' | sed -n '1,30p'
    } >"$OUT/top-$flavor.txt"
  fi
done

"$PY" "$HELPER" report --out "$OUT" --low "$LOW" --high "$HIGH"
echo
echo "Took $((SECONDS - t_start)) s; binary $BIN; $CLUSTERS clusters per response; artefacts in $OUT" \
  "(top-<flavor>.txt: per-function marginal Ir and callgrind_annotate of the K=$HIGH runs)."
