#!/usr/bin/env bash
# One command for a GPU machine with no network: install, report, test, verify,
# compute-sanitizer, benchmark. Every step runs under `timeout`, all steps together
# within TOTAL_S seconds (default 570, i.e. under 10 minutes); logs and results go to
# one folder, OUT_DIR (default bench/results/<gpu-name>/). Prints one line per step:
# ok / failed (rc) / timeout / skipped (why). Exit status: 0 if no step failed or timed out.
#
#   bash bench/device_check.sh
#   OUT_DIR=/tmp/h100 TOTAL_S=900 BENCH_PROVIDERS=casa-triton,casa-cuda,full-sdpa bash bench/device_check.sh
#
# casa-compile is left out of BENCH_PROVIDERS by default: it compiles once per point,
# which does not fit the 10-minute budget; run `python -m bench attention --providers
# casa-compile` separately.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TOTAL_S=${TOTAL_S:-570}
START=$(date +%s)
BENCH_PROVIDERS=${BENCH_PROVIDERS:-casa-reference,casa-triton,casa-cuda,full-einsum,full-sdpa}

gpu_slug=$($PY - <<'PY' 2>/dev/null
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
PY
)
[[ "$gpu_slug" == no-gpu ]] && echo "warning: torch sees no CUDA device; the GPU steps will fail" >&2
OUT_DIR=${OUT_DIR:-bench/results/${gpu_slug:-unknown-gpu}}
LOG_DIR="$OUT_DIR/device_check_logs"
mkdir -p "$LOG_DIR"
SUMMARY="$OUT_DIR/device_check_summary.txt"
: > "$SUMMARY"
failures=0

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, time left).
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  local log="$LOG_DIR/$name.log"
  if (( limit < 5 )); then
    echo "$name: skipped (no time left of TOTAL_S=$TOTAL_S)" | tee -a "$SUMMARY"; return
  fi
  echo "== $name (timeout ${limit}s): $*" | tee "$log"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$? took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    echo "$name: ok (${took}s)" | tee -a "$SUMMARY"
  elif (( rc == 124 || rc == 137 )); then
    failures=$((failures + 1)); tail -n 15 "$log"
    echo "$name: timeout after ${took}s (log $log)" | tee -a "$SUMMARY"
  else
    failures=$((failures + 1)); tail -n 25 "$log"
    echo "$name: failed rc=$rc (${took}s, log $log)" | tee -a "$SUMMARY"
  fi
}

skip() { echo "$1: skipped ($2)" | tee -a "$SUMMARY"; }

# reason_unavailable BACKEND: empty when the backend serves float32 CUDA tensors here.
reason_unavailable() {
  $PY - "$1" <<'PY' 2>&1 | tail -n 1
import sys, torch, casa_kernels
from casa_kernels.ops.registry import get_backend
name = sys.argv[1]
if name not in casa_kernels.backend_names():
    print(f"backend {name!r} not registered"); sys.exit()
if not torch.cuda.is_available():
    print("no CUDA device"); sys.exit()
print(get_backend(name).reason_not_serving(torch.device("cuda"), torch.float32) or "")
PY
}

step install 240 $PY -m pip install --no-build-isolation --no-deps -e .
if [[ -f casa_kernels/info.py ]]; then
  step info 30 $PY -m casa_kernels.info
else
  skip info "casa_kernels/info.py not in this checkout"
fi
step tests 150 $PY -m pytest tests -q
step verify 60 $PY -m casa_kernels.verify --device cuda

SANITIZE='import sys, torch
from casa_kernels import ScoreAttentionWeights, casa_attention
g = torch.Generator().manual_seed(0)
for b, n, d, k in ((2, 37, 64, 3), (1, 7, 128, 5)):
    w = ScoreAttentionWeights.random(n, d, k, device="cuda", generator=g)
    x = torch.randn(b, n, d, generator=g).cuda()
    y = casa_attention(x, w, backend=sys.argv[1])
    torch.cuda.synchronize()
    print(sys.argv[1], tuple(y.shape), float(y.float().abs().sum()))'
for backend in cuda triton; do
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    skip "memcheck-$backend" "compute-sanitizer not on PATH"; continue
  fi
  reason=$(reason_unavailable "$backend")
  if [[ -n "$reason" ]]; then skip "memcheck-$backend" "$reason"; continue; fi
  step "memcheck-$backend" 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PY -c "$SANITIZE" "$backend"
done

step bench-attention 100 $PY -m bench attention --device cuda --dtype bfloat16 \
  --providers "$BENCH_PROVIDERS" --out "$OUT_DIR" --no-progress
step bench-scaling 150 $PY -m bench scaling --device cuda --quick \
  --providers "$BENCH_PROVIDERS" --out "$OUT_DIR" --no-progress

echo "== device_check: $(( $(date +%s) - START ))s, $failures step(s) failed; results and logs in $OUT_DIR"
cat "$SUMMARY"
exit $(( failures > 0 ))
