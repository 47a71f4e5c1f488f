#!/usr/bin/env bash
# Build whymatch with CUDA kernels, run the CUDA tests, run benchmarks/gpu_rise.py.
#
# Unattended, no network, on one GPU (written for an H100 with torch 2.11+cu130,
# Python 3.12); about 6 minutes. The step caps add up to about 15 minutes, more than the
# device tool's 10-minute limit per call: lower them (or SAL_ARGS) if a step runs long.
# Run from anywhere:
#
#     bash benchmarks/gpu_suite.sh
#
# Everything lands in $OUT (default benchmarks/results/gpu), at most 15 files:
#   suite.log        environment, each step's exit status, summary
#   build.log        pip / CMake / nvcc output
#   pytest_cuda.log  python -m pytest tests -q -m cuda -x
#   gpu_rise.log     the benchmark's output
#   gpu_rise.json / gpu_rise.md   the benchmark's results
#   saliency_table.{log,json,md}  every saliency method on ShapesWorld pairs, on the GPU
#   soft_mask.{log,json,md}  fused soft mask vs composite PyTorch, 180 x 3 x 224 x 224
#   recall_cuda.{log,json,md}  Recall@{1,2,4,8} of 60,000 x 512 self-retrieval on the GPU
#
# Environment knobs: PYTHON (default python3), WHYMATCH_CUDA_ARCHITECTURES
# (default 90), BUILD_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT in seconds
# (default 180 / 150 / 200), SAL_TIMEOUT (240), SAL_ARGS (saliency_table.py arguments), GPU_RISE_ARGS (extra arguments for gpu_rise.py),
# SM_TIMEOUT / SM_ARGS (soft_mask.py, 150 s), RC_TIMEOUT / RC_ARGS (recall_cpu.py --device cuda, 150 s),
# SKIP_BUILD=1 (use the whymatch already installed), SUITE_DRY_RUN=1 (check this
# script on a machine without a GPU: no build, no CUDA check, gpu_rise.py --dry-run).
# Exit status: 0 when the build, the tests and every benchmark check passed.

set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export WHYMATCH_CUDA=ON
export WHYMATCH_CUDA_ARCHITECTURES="${WHYMATCH_CUDA_ARCHITECTURES:-90}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-180}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-200}"

SUITE_LOG="$OUT/suite.log"
: > "$SUITE_LOG"
log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$SUITE_LOG"; }
START=$SECONDS

log "repo $REPO, OUT $OUT, python $(command -v "$PY")"
{
  echo "--- git"; git -C "$REPO" rev-parse HEAD 2>&1; git -C "$REPO" status --short 2>&1 | head -20
  echo "--- nvidia-smi"; nvidia-smi 2>&1 | head -25
  echo "--- nvcc"; (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1 | tail -2
  echo "--- python packages"
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "scikit-build-core", "pybind11", "cmake", "ninja", "pytest", "pytest-timeout", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import torch
print("torch.cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} >> "$SUITE_LOG" 2>&1

# ---------------------------------------------------------------- 1. build
BUILD_RC=0
DRY="${SUITE_DRY_RUN:-0}"
if [ "$DRY" = "1" ]; then
  log "DRY RUN: no build, CUDA not required, gpu_rise.py --dry-run"
  SKIP_BUILD=1
  GPU_RISE_ARGS="--dry-run ${GPU_RISE_ARGS:-}"
fi
if [ "${SKIP_BUILD:-0}" = "1" ]; then
  log "build: skipped (SKIP_BUILD=1)"
else
  log "build: pip install --no-build-isolation --no-deps . (WHYMATCH_CUDA=ON, architectures $WHYMATCH_CUDA_ARCHITECTURES, cap ${BUILD_TIMEOUT}s)"
  t0=$SECONDS
  timeout --kill-after=15 "$BUILD_TIMEOUT" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1
  BUILD_RC=$?
  log "build: exit $BUILD_RC after $((SECONDS - t0)) s"
  if [ $BUILD_RC -ne 0 ]; then
    tail -40 "$OUT/build.log" | tee -a "$SUITE_LOG"
  fi
fi

# check from outside the source tree that the installed package has working CUDA kernels
( cd /tmp && "$PY" - <<'EOF' ) >> "$SUITE_LOG" 2>&1
import json, whymatch
info = whymatch.build_info()
print("whymatch from", whymatch.__file__)
print(json.dumps(info, indent=1))
ok = "rise_apply" in info["cuda_kernels"] and bool(info["cuda_devices"])
print("CUDA kernels usable:", ok)
raise SystemExit(0 if ok else 1)
EOF
KERNELS_RC=$?
log "installed whymatch CUDA kernels usable: $([ $KERNELS_RC -eq 0 ] && echo yes || echo NO; true)"
if [ $BUILD_RC -ne 0 ] || { [ $KERNELS_RC -ne 0 ] && [ "$DRY" != "1" ]; }; then
  log "stopping: no usable CUDA build (see build.log and above)"
  exit 1
fi

# ---------------------------------------------------------------- 2. CUDA tests
TEST_ARGS=(tests -q -m cuda -x -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TEST_ARGS+=(--timeout=120)
fi
log "tests: $PY -m pytest ${TEST_ARGS[*]} (cap ${TEST_TIMEOUT}s)"
t0=$SECONDS
timeout --kill-after=15 "$TEST_TIMEOUT" "$PY" -m pytest "${TEST_ARGS[@]}" > "$OUT/pytest_cuda.log" 2>&1
TEST_RC=$?
case $TEST_RC in
  0) log "tests: passed after $((SECONDS - t0)) s ($(tail -1 "$OUT/pytest_cuda.log"))" ;;
  5) log "tests: no CUDA tests were collected (pytest exit 5)"; TEST_RC=0 ;;
  124) log "tests: TIMED OUT after ${TEST_TIMEOUT}s"; tail -20 "$OUT/pytest_cuda.log" | tee -a "$SUITE_LOG" ;;
  *) log "tests: FAILED (exit $TEST_RC) after $((SECONDS - t0)) s"; tail -30 "$OUT/pytest_cuda.log" | tee -a "$SUITE_LOG" ;;
esac

# ---------------------------------------------------------------- 3. benchmark
log "benchmark: $PY benchmarks/gpu_rise.py --out $OUT ${GPU_RISE_ARGS:-} (cap ${BENCH_TIMEOUT}s)"
t0=$SECONDS
# shellcheck disable=SC2086
timeout --kill-after=15 "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_rise.py --out "$OUT" ${GPU_RISE_ARGS:-} > "$OUT/gpu_rise.log" 2>&1
BENCH_RC=$?
log "benchmark: exit $BENCH_RC after $((SECONDS - t0)) s$([ $BENCH_RC -eq 124 ] && echo ' (TIMED OUT: partial results in gpu_rise.json)'; true)"
if [ -f "$OUT/gpu_rise.md" ]; then
  cat "$OUT/gpu_rise.md" >> "$SUITE_LOG"
fi
tail -45 "$OUT/gpu_rise.log"

# run_step NAME CAP LOGSTEM CMD...: run CMD under a time cap, output to $OUT/LOGSTEM.log; sets STEP_RC
run_step() {
  local name=$1 cap=$2 stem=$3
  shift 3
  log "$name: $* (cap ${cap}s)"
  local t0=$SECONDS
  timeout --kill-after=15 "$cap" "$@" > "$OUT/$stem.log" 2>&1
  STEP_RC=$?
  log "$name: exit $STEP_RC after $((SECONDS - t0)) s"
  tail -25 "$OUT/$stem.log"
}

# ---------------------------------------------------------------- 4. saliency table on the GPU
SAL_ARGS="${SAL_ARGS:---queries 30 --refs 3}"
if [ "$DRY" = "1" ]; then SAL_ARGS="--queries 2 --refs 2 --methods rise,attention"; fi
SAL_DEV=cuda; [ "$DRY" = "1" ] && SAL_DEV=cpu
# shellcheck disable=SC2086
run_step "saliency table" "${SAL_TIMEOUT:-240}" saliency_table \
  "$PY" benchmarks/saliency_table.py --device "$SAL_DEV" --stem "$OUT/saliency_table" $SAL_ARGS
SAL_RC=$STEP_RC

# ---------------------------------------------------------------- 5. soft mask (similarity mining) on the GPU
SM_ARGS="${SM_ARGS:---dtypes float32,bfloat16}"
SM_DEV=cuda
if [ "$DRY" = "1" ]; then SM_ARGS="--dry-run --no-compile"; SM_DEV=cpu; fi
# shellcheck disable=SC2086
run_step "soft mask" "${SM_TIMEOUT:-150}" soft_mask \
  "$PY" benchmarks/soft_mask.py --device "$SM_DEV" --stem "$OUT/soft_mask" $SM_ARGS
SM_RC=$STEP_RC

# ---------------------------------------------------------------- 6. Recall@K at 60,000 x 512 on the GPU
RC_ARGS="${RC_ARGS:---n 60000 --dim 512 --classes 600}"
RC_DEV=cuda
if [ "$DRY" = "1" ]; then RC_ARGS="--n 2000 --classes 40"; RC_DEV=cpu; fi
# shellcheck disable=SC2086
run_step "recall" "${RC_TIMEOUT:-150}" recall_cuda \
  "$PY" benchmarks/recall_cpu.py --device "$RC_DEV" --stem "$OUT/recall_cuda" $RC_ARGS
RC_RC=$STEP_RC

log "done in $((SECONDS - START)) s: build $BUILD_RC, tests $TEST_RC, benchmark $BENCH_RC, saliency table $SAL_RC, soft mask $SM_RC, recall $RC_RC"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $SAL_RC -eq 0 ] && [ $SM_RC -eq 0 ] && [ $RC_RC -eq 0 ]
