#!/usr/bin/env bash
# One command for a GPU machine without network: preflight, build, test, verify,
# compute-sanitizer, benchmark. Each step runs under its own timeout; the whole run
# takes at most TOTAL_S seconds (default 480, build included).
#
#   bash bench/device_check.sh             # results in bench/results/<gpu-name>/
#   OUT_DIR=$OUT bash bench/device_check.sh
#   bash bench/device_check.sh --dry-run   # any machine, seconds: the preflight, the step
#                                          # plumbing, info, packing and summary; GPU steps skipped
#
# Before the run, on a development machine (no GPU), with the GPU machine's Triton release
# (3.6.0 on the H200 image) and the interpreter off, compile the Triton kernels the steps
# launch into the folder the run carries (~25 MiB for 131 kernels; name it in the device tool's carry):
#   python -m bench.triton_aot record-tests .triton_aot/test_calls.jsonl   # needs pytest
#   <python with triton 3.6.0> -m bench.triton_aot build .triton_aot \
#       --test-calls .triton_aot/test_calls.jsonl
#
# Steps and caps (seconds of 480; another TOTAL_S scales them; they add up to TOTAL_S):
#   preflight 25   torch sees a GPU, triton, nvcc's CUDA major = torch's, setuptools
#                  (borrowed from a wheel or another Python if the venv has none), the
#                  CUTLASS headers (CUTLASS_PATH, the nvidia-cutlass wheel installed, or
#                  .whl/nvidia_cutlass-*.whl carried to the machine), ninja,
#                  pytest, compute-sanitizer; optional: hypothesis, tqdm, matplotlib
#   triton-cache 15 python -m bench.triton_aot install TRITON_AOT (default .triton_aot): the
#                  kernels compiled ahead of time, re-keyed into this run's Triton cache when
#                  Triton, GPU arch and ptxas match the build's; else nothing is installed and
#                  the kernels compile here: on every core, in the background, while the build
#                  and the CUDA tests run (python -m bench.triton_aot precompile). Its summary
#                  row also says, at the end, how many kernels and launcher modules this
#                  machine compiled itself.
#   build 110      FORCE_CUDA=1 python setup.py build_ext --inplace (no pip, no network),
#                  TORCH_CUDA_ARCH_LIST = the GPU's (9.0a on a Hopper GPU), MAX_JOBS = all
#                  cores; fails unless casa::fused_score_attention then has a CUDA kernel;
#                  names the architectures the library embeds
#   info 10        python -m casa_kernels.info
#   tests-cuda 35, tests-triton 55
#                  pytest -x tests/ops/test_cuda.py, then tests/ops/test_triton.py (a failure
#                  in one does not stop the other), each without its CPU-only compile check
#   verify 25      python -m casa_kernels.verify --device cuda --quick
#   memcheck-triton 25, racecheck-triton 25, memcheck-cuda 20, racecheck-cuda 20
#                  compute-sanitizer on `python -m bench.device_check sanitize BACKEND`
#   bench-attention 40   bf16, Traffic and Wide20k, B=16 and B=1, BENCH_PROVIDERS
#   bench-scaling 35     bf16, --quick
#   bench-autotuned 35   casa-triton autotuned (without CASA_TRITON_SINGLE_CONFIG), Traffic
#   summary 5            reserved for the last summary and archive
# A step may run until its deadline (START + its cap + the caps before it): time an early
# step leaves over goes to the later ones. CASA_TRITON_SINGLE_CONFIG=1 (one config per
# Triton kernel, no autotuning) is set for every step but bench-autotuned.
#
# Output: OUT_DIR (default bench/results/<gpu-name>/; a new temporary folder when there
# is no GPU or with --dry-run) gets three files, rewritten after every step, so a run cut
# short keeps what finished: device_check.tar.gz (logs/NN-step.log, results/ with the
# benchmarks' CSV, JSON and PNG, results/autotuned/, environment.json, the summaries),
# device_check_summary.md and device_check_summary.json (step, status, seconds, cap, key
# figure). The summary table is printed last. Back on a development machine,
# `python -m bench.device_check unpack device_check.tar.gz` upserts the benchmark rows
# into bench/results/<gpu-name>/.
#
# Environment: PYTHON (default python3), TOTAL_S, OUT_DIR, TRITON_AOT, BENCH_PROVIDERS
# (default casa-reference,casa-triton,casa-cuda,full-einsum,full-sdpa), MAX_JOBS (default: all
# cores), TORCH_CUDA_ARCH_LIST (default: the GPU's).
# Exit status: 0 when no step failed or timed out (a dry run skips the GPU steps), 1
# otherwise, 2 for a bad argument.

# No `set -e`: a failing step is recorded and the run goes on.
set -uo pipefail
OUT_DIR=${OUT_DIR:-}
if [[ -n $OUT_DIR && $OUT_DIR != /* ]]; then OUT_DIR="$PWD/$OUT_DIR"; fi
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "device_check: unknown argument '$1' (expected --dry-run or --help)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "device_check: no Python '$PY' (set PYTHON)" >&2; exit 2
fi
TOTAL_S=${TOTAL_S:-480}
if ! [[ $TOTAL_S =~ ^[0-9]+$ ]] || (( TOTAL_S < 60 )); then
  echo "device_check: TOTAL_S=$TOTAL_S is not a number of seconds >= 60" >&2; exit 2
fi
BENCH_PROVIDERS=${BENCH_PROVIDERS:-casa-reference,casa-triton,casa-cuda,full-einsum,full-sdpa}
export PYTHONUNBUFFERED=1 CASA_TRITON_SINGLE_CONFIG=1
START=$(date +%s)

NAMES=(preflight triton-cache build info tests-cuda tests-triton verify memcheck-triton racecheck-triton memcheck-cuda
       racecheck-cuda bench-attention bench-scaling bench-autotuned summary)
SHARES=(25 15 110 10 35 55 25 25 25 20 20 40 35 35 5)  # seconds of 480
declare -A CAP DEADLINE ORDER
cumulative=0 shares=0
for i in "${!NAMES[@]}"; do
  shares=$(( shares + SHARES[i] ))
  deadline=$(( TOTAL_S * shares / 480 ))
  CAP[${NAMES[i]}]=$(( deadline - cumulative ))
  DEADLINE[${NAMES[i]}]=$deadline
  ORDER[${NAMES[i]}]=$i
  cumulative=$deadline
done
caps=""
for name in "${NAMES[@]}"; do caps+="$name ${CAP[$name]}, "; done
echo "device_check: ${TOTAL_S}s in all$( ((DRY_RUN)) && echo ', dry run'); caps: ${caps%, } (sum $cumulative)"

WORK=$(mktemp -d -t casa_device_check.XXXXXX)
# This run's own Triton cache (outside WORK, which is archived): what it holds at the end
# beyond the installed entries was compiled here.
export TRITON_CACHE_DIR
TRITON_CACHE_DIR=$(mktemp -d -t casa_device_check_triton.XXXXXX)
trap 'rm -rf "$WORK" "$TRITON_CACHE_DIR"' EXIT
TRITON_AOT=${TRITON_AOT:-.triton_aot}
mkdir -p "$WORK/logs" "$WORK/results"
FAILED=()

# run_step NAME WHY_NOT COMMAND...: skipped when WHY_NOT is set; else COMMAND runs, its
# output in logs/NN-NAME.log, killed at the step's deadline. Sets STATUS, TOOK, REASON.
run_step() {
  local name=$1 why_not=$2; shift 2
  local log limit t0 rc
  log="$WORK/logs/$(printf '%02d' "${ORDER[$name]}")-$name.log"
  TOOK=0 REASON=""
  if [[ -n $why_not ]]; then
    STATUS=skipped REASON=$why_not; return
  fi
  limit=$(( START + DEADLINE[$name] - $(date +%s) ))
  if (( limit < 3 )); then
    STATUS=timeout REASON="not started: the run is past this step's deadline (${DEADLINE[$name]}s)"; return
  fi
  echo "== $name (${limit}s left to its deadline): $*"
  printf '$ %s\n' "$*" >"$log"
  t0=$(date +%s)
  timeout --kill-after=3 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  TOOK=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS=ok ;;
    124|137) STATUS=timeout REASON="killed at its deadline after ${TOOK}s" ;;
    *) STATUS=failed ;;
  esac
  if [[ $STATUS != ok ]]; then
    echo "-- last lines of $(basename "$log") (exit status $rc):"
    tail -n 20 "$log" | sed 's/^/   /'
  fi
}

# record NAME: the step's row into the summaries and the archive in OUT_DIR.
record() {
  "$PY" -m bench.device_check record "$WORK" "$OUT_DIR" "$1" "$STATUS" "$TOOK" "${CAP[$1]}" "$REASON" \
    || echo "device_check: could not record step $1 (the output above says why)" >&2
  if [[ $STATUS == failed || $STATUS == timeout ]]; then FAILED+=("$1"); fi
}

step() { run_step "$@"; record "$1"; }

# first_of REASON...: the first non-empty argument.
first_of() {
  local r
  for r in "$@"; do if [[ -n $r ]]; then echo "$r"; return; fi; done
}

# --- preflight: decides OUT_DIR and which steps can run ---------------------------------
PREFLIGHT=("$PY" -m bench.device_check preflight "$WORK")
if (( DRY_RUN )); then PREFLIGHT+=(--dry-run); fi
run_step preflight "" "${PREFLIGHT[@]}"
PF_NO_GPU="preflight did not finish (see its log)" PF_NO_TRITON="" PF_NO_NVCC="" PF_NO_SETUPTOOLS=""
PF_NO_PYTEST="" PF_SANITIZER="" PF_SETUPTOOLS_PATH="" PF_NINJA_DIR="" PF_CUDA_HOME="" PF_GPU_SLUG="" PF_GPU_ARCH=""
PF_CUTLASS_PATH="" PF_NO_CUTLASS=""
if [[ -f $WORK/preflight.env ]]; then
  # shellcheck disable=SC1091  # written by bench/device_check.py, values shell-quoted
  source "$WORK/preflight.env"
fi
if [[ -z $OUT_DIR ]]; then
  if (( DRY_RUN )) || [[ -z $PF_GPU_SLUG ]]; then
    OUT_DIR=$(mktemp -d -t casa_device_check_out.XXXXXX)
  else
    OUT_DIR=bench/results/$PF_GPU_SLUG
  fi
fi
record preflight

if [[ -n $PF_SETUPTOOLS_PATH ]]; then export PYTHONPATH="$PF_SETUPTOOLS_PATH${PYTHONPATH:+:$PYTHONPATH}"; fi
if [[ -n $PF_NINJA_DIR ]]; then export PATH="$PATH:$PF_NINJA_DIR"; fi
if [[ -n $PF_CUDA_HOME ]]; then export CUDA_HOME=${CUDA_HOME:-$PF_CUDA_HOME}; fi
if [[ -n $PF_CUTLASS_PATH ]]; then export CUTLASS_PATH=$PF_CUTLASS_PATH; fi

NO_GPU=$PF_NO_GPU
if (( DRY_RUN )); then NO_GPU="dry run${PF_NO_GPU:+ ($PF_NO_GPU)}"; fi
NO_SANITIZER=""
if [[ -z $PF_SANITIZER ]]; then NO_SANITIZER="compute-sanitizer not found"; fi

# --- the Triton kernels compiled ahead of time --------------------------------------------
INSTALL=("$PY" -m bench.triton_aot install "$TRITON_AOT" "$TRITON_CACHE_DIR")
if (( DRY_RUN )); then INSTALL+=(--dry-run); fi
step triton-cache "" "${INSTALL[@]}"
TRITON_CACHE_STATUS=$STATUS TRITON_CACHE_TOOK=$TOOK
TRITON_CACHE_LOG="$WORK/logs/$(printf '%02d' "${ORDER[triton-cache]}")-triton-cache.log"
PRECOMPILE_PID=""
if [[ -z $NO_GPU ]] && grep -q "^triton cache: .*compile here" "$TRITON_CACHE_LOG"; then
  # The fallback: the kernels compiled here on every core while the CUDA build runs,
  # finished (or stopped) before the Triton tests start.
  limit=$(( START + DEADLINE[tests-cuda] - $(date +%s) ))
  nice -n 5 timeout "$(( limit > 1 ? limit : 1 ))" "$PY" -m bench.triton_aot precompile "$TRITON_AOT" \
    >>"$TRITON_CACHE_LOG" 2>&1 &
  PRECOMPILE_PID=$!
fi

# --- build ------------------------------------------------------------------------------
BUILD_PROBLEM=$(first_of "$PF_NO_NVCC" "$PF_NO_SETUPTOOLS" "$PF_NO_CUTLASS")
if [[ -n $BUILD_PROBLEM ]]; then
  step build "$NO_GPU" bash -c 'echo "build: FAILED before compiling: $1"; exit 1' build "$BUILD_PROBLEM"
else
  step build "$NO_GPU" env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$PF_GPU_ARCH}" \
    bash -c 'echo "build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" &&
      "$0" setup.py build_ext --inplace && "$0" -m bench.device_check cuda-kernel' "$PY"
fi
NO_CUDA_KERNEL=""
case $STATUS in
  failed) NO_CUDA_KERNEL="no CUDA kernel: the build step failed" ;;
  timeout) NO_CUDA_KERNEL="no CUDA kernel: the build step timed out" ;;
esac

# --- checks -----------------------------------------------------------------------------
step info "" "$PY" -m casa_kernels.info
PYTEST=("$PY" -m pytest -x -q -rs --durations=10 -p no:cacheprovider)
# test_cuda_sources_compile repeats the build's nvcc work for two more architectures.
step tests-cuda "$(first_of "$NO_GPU" "$PF_NO_PYTEST")" "${PYTEST[@]}" tests/ops/test_cuda.py \
  --deselect tests/ops/test_cuda.py::test_cuda_sources_compile
if [[ -n $PRECOMPILE_PID ]]; then wait "$PRECOMPILE_PID"; fi
# test_kernels_compile_for_sm90_without_gpu compiles every kernel afresh on the CPU (CI does).
step tests-triton "$(first_of "$NO_GPU" "$PF_NO_PYTEST")" "${PYTEST[@]}" tests/ops/test_triton.py \
  --deselect tests/ops/test_triton.py::test_kernels_compile_for_sm90_without_gpu
step verify "$NO_GPU" "$PY" -m casa_kernels.verify --device cuda --quick
for backend in triton cuda; do
  if [[ $backend == triton ]]; then no_backend=$PF_NO_TRITON; else no_backend=$NO_CUDA_KERNEL; fi
  # Without the caching allocator every tensor is its own allocation: memcheck sees overruns.
  # API errors are not reported: CUDA libraries probe for entry points that may not exist,
  # and a failing API call raises in Python anyway.
  step "memcheck-$backend" "$(first_of "$NO_GPU" "$no_backend" "$NO_SANITIZER")" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$PF_SANITIZER" --tool memcheck --report-api-errors no \
    --error-exitcode 1 --print-limit 50 "$PY" -m bench.device_check sanitize "$backend"
  step "racecheck-$backend" "$(first_of "$NO_GPU" "$no_backend" "$NO_SANITIZER")" \
    "$PF_SANITIZER" --tool racecheck --report-api-errors no --error-exitcode 1 --print-limit 50 \
    "$PY" -m bench.device_check sanitize "$backend"
done

# --- benchmarks -------------------------------------------------------------------------
step bench-attention "$NO_GPU" "$PY" -m bench attention --device cuda --dtype bfloat16 \
  --datasets Traffic,Wide20k --batch 16,1 --providers "$BENCH_PROVIDERS" --out "$WORK/results" --no-progress
step bench-scaling "$NO_GPU" "$PY" -m bench scaling --device cuda --dtype bfloat16 --quick \
  --providers "$BENCH_PROVIDERS" --out "$WORK/results" --no-progress
step bench-autotuned "$(first_of "$NO_GPU" "$PF_NO_TRITON")" env -u CASA_TRITON_SINGLE_CONFIG \
  "$PY" -m bench attention --device cuda --dtype bfloat16 --datasets Traffic --batch 16,1 \
  --providers casa-triton --out "$WORK/results/autotuned" --no-progress

# The triton-cache row gets what this machine compiled itself.
"$PY" -m bench.triton_aot compiled "$TRITON_CACHE_DIR" >>"$TRITON_CACHE_LOG" 2>&1
STATUS=$TRITON_CACHE_STATUS TOOK=$TRITON_CACHE_TOOK REASON=""
"$PY" -m bench.device_check record "$WORK" "$OUT_DIR" triton-cache "$STATUS" "$TOOK" "${CAP[triton-cache]}" "" >/dev/null \
  || echo "device_check: could not record what this machine compiled" >&2

echo
echo "device_check: $(( $(date +%s) - START ))s of ${TOTAL_S}s; ${#FAILED[@]} step(s) failed or timed out${FAILED[*]:+: ${FAILED[*]}}"
echo "device_check: $OUT_DIR holds $(cd "$OUT_DIR" && echo device_check*)"
"$PY" -m bench.device_check table "$WORK"
(( ${#FAILED[@]} == 0 ))
