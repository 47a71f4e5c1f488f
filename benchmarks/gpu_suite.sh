#!/usr/bin/env bash
# Build whymatch with CUDA kernels, run the CUDA tests and the GPU benchmarks (RISE, saliency
# table, soft mask, Recall@K, AVSL, AVSL at SOP scale).
#
# Unattended, no network, on one GPU (written for an H100 with torch 2.11+cu130,
# Python 3.12). The step caps add up to about 33 minutes (build 180 + tests 150 + rise 200 +
# saliency 240 + softmask 150 + recall 150 + avsl 240 + avsl cam 120 + avsl smem 120 + sop 420 = 1970 s), more
# than the device tool's 10-minute limit per call: run it in four calls with STEPS, each call's
# caps under 600 s (see STEPS below). Steps usually end well before their caps.
# Run from anywhere:
#
#     bash benchmarks/gpu_suite.sh
#
# Everything lands in $OUT (default benchmarks/results/gpu), at most 33 files:
#   suite.log        environment, each step's exit status, summary
#   build.log        pip / CMake / nvcc output
#   pytest_cuda.log  python -m pytest tests -q -m cuda -x
#   gpu_rise.log     the benchmark's output
#   gpu_rise.json / gpu_rise.md   the benchmark's results
#   saliency_table.{log,json,md}  every saliency method on ShapesWorld pairs, on the GPU
#   soft_mask.{log,json,md}  fused soft mask vs composite PyTorch, 180 x 3 x 224 x 224
#   recall_cuda.{log,json,md}  Recall@{1,2,4,8} of 60,000 x 512 self-retrieval on the GPU
#   avsl_cuda.{log,json,md}  AVSL distance + top-k (20,000 x 20,000 by default) vs the sliced baseline
#   avsl_cam_cuda.{log,json,md}  AVSL CAM correlation + edges + reliabilities, B = 180, R = 512
#   avsl_cuda_smem128k.{log,json,md}  the AVSL kernels with WHYMATCH_AVSL_CUDA_SMEM=131072 (whymatch only)
#   avsl_sop_cuda.{log,json,md}  AVSL time to Recall@{1,10,100}, 60,502 x 60,502 (SOP-shaped
#                    synthetic data) vs the sliced baseline (stopped at a time budget, extrapolated)
#   avsl_sop_tensorcore.{log,json,md} / avsl_sop_cublas.{log,json,md}  step sop_paths: the two AVSL
#                    GPU paths forced at SOP scale (the first beside the sliced baseline; the cuBLAS
#                    path with its fused prologue / blend / epilogue kernels)
#   avsl_sop_cublas_torch.{log,json,md}  step sop_cublas_torch: the cuBLAS path's torch-op form
#                    (WHYMATCH_AVSL_CUBLAS_FUSED=0), to measure what the fused kernels save
#
# Environment knobs: PYTHON (default python3), WHYMATCH_CUDA_ARCHITECTURES
# (default 90), BUILD_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT in seconds
# (default 180 / 150 / 200), SAL_TIMEOUT (240), SAL_ARGS (saliency_table.py arguments), GPU_RISE_ARGS (extra arguments for gpu_rise.py),
# SM_TIMEOUT / SM_ARGS (soft_mask.py, 150 s), RC_TIMEOUT / RC_ARGS (recall_cpu.py --device cuda, 150 s),
# AV_TIMEOUT / AV_ARGS (avsl_cpu.py --device cuda, 240 s), AVK_TIMEOUT (its 128 KiB run, 120 s), SOP_TIMEOUT / SOP_ARGS
# (avsl_sop.py --device cuda, 420 s; default arguments --time-budget 150 --timeout 190: each
# variant's process is capped at 190 s and the baseline stops after ~150 s, so 2 x 190 s + the
# script's own ~15 s stay under 420 s; SOP_ARGS replaces them, keep them in), STEPS (which steps; see below),
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

# STEPS: which of tests,rise,saliency,softmask,recall,avsl,sop,sop_paths,sop_cublas_torch to run (default: all but
# sop_paths and sop_cublas_torch). With the
# device tool's 10-minute limit per call, run the suite in back-to-back calls (the machine stays
# warm and keeps the build). By the caps, four calls (each under 600 s, plus a few seconds of
# this script's checks):
#   STEPS=tests,rise                          build 180 + tests 150 + rise 200         = 530 s
#   SKIP_BUILD=1 STEPS=saliency,softmask,recall  240 + 150 + 150                       = 540 s
#   SKIP_BUILD=1 STEPS=avsl                   avsl 240 + avsl cam 120 + smem 120       = 480 s
#   SKIP_BUILD=1 STEPS=sop                    sop 420                                  = 420 s
# (the earlier two-call split tests,rise,saliency / softmask,recall,avsl was already over 600 s
# by the caps: 770 s and 660 s; with sop the second would be 1080 s). Three calls fit only when
# steps end well before their caps, e.g. tests,rise,saliency / softmask,recall,avsl / sop.
STEPS="${STEPS:-tests,rise,saliency,softmask,recall,avsl,sop}"
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
TEST_RC=0; BENCH_RC=0; SAL_RC=0; SM_RC=0; RC_RC=0; AV_RC=0; SOP_RC=0

# run_step NAME CAP LOGSTEM CMD...: run CMD under a time cap, output to $OUT/LOGSTEM.log; sets STEP_RC
run_step() {
  local name=$1 cap=$2 stem=$3
  shift 3
  log "$name: $* (cap ${cap}s)"
  local t0=$SECONDS
  timeout --kill-after=15 "$cap" "$@" > "$OUT/$stem.log" 2>&1
  STEP_RC=$?
  log "$name: exit $STEP_RC after $((SECONDS - t0)) s$([ $STEP_RC -eq 124 ] && echo ' (TIMED OUT)'; true)"
  tail -25 "$OUT/$stem.log"
}

# ---------------------------------------------------------------- 2. CUDA tests
if want tests; then
  # a test module that cannot import (a dependency the --no-deps install skipped) must not stop the CUDA tests
  TEST_ARGS=(tests -q -m cuda -x -p no:cacheprovider --continue-on-collection-errors -rfE)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TEST_ARGS+=(--timeout=120)
  fi
  run_step tests "$TEST_TIMEOUT" pytest_cuda "$PY" -m pytest "${TEST_ARGS[@]}"
  TEST_RC=$STEP_RC
  [ $TEST_RC -eq 5 ] && { log "tests: no CUDA tests were collected (pytest exit 5)"; TEST_RC=0; }
fi

# ---------------------------------------------------------------- 3. RISE benchmark
if want rise; then
  # shellcheck disable=SC2086
  run_step benchmark "$BENCH_TIMEOUT" gpu_rise "$PY" benchmarks/gpu_rise.py --out "$OUT" ${GPU_RISE_ARGS:-}
  BENCH_RC=$STEP_RC
  [ -f "$OUT/gpu_rise.md" ] && cat "$OUT/gpu_rise.md" >> "$SUITE_LOG"
fi

# ---------------------------------------------------------------- 4. saliency table on the GPU
if want saliency; then
  SAL_ARGS="${SAL_ARGS:---queries 30 --refs 3}"
  if [ "$DRY" = "1" ]; then SAL_ARGS="--queries 2 --refs 2 --methods rise,attention"; fi
  SAL_DEV=cuda; [ "$DRY" = "1" ] && SAL_DEV=cpu
  # shellcheck disable=SC2086
  run_step "saliency table" "${SAL_TIMEOUT:-240}" saliency_table \
    "$PY" benchmarks/saliency_table.py --device "$SAL_DEV" --stem "$OUT/saliency_table" $SAL_ARGS
  SAL_RC=$STEP_RC
fi

# ---------------------------------------------------------------- 5. soft mask (similarity mining) on the GPU
if want softmask; then
  SM_ARGS="${SM_ARGS:---dtypes float32,bfloat16}"
  SM_DEV=cuda
  if [ "$DRY" = "1" ]; then SM_ARGS="--dry-run --no-compile"; SM_DEV=cpu; fi
  # shellcheck disable=SC2086
  run_step "soft mask" "${SM_TIMEOUT:-150}" soft_mask \
    "$PY" benchmarks/soft_mask.py --device "$SM_DEV" --stem "$OUT/soft_mask" $SM_ARGS
  SM_RC=$STEP_RC
fi

# ---------------------------------------------------------------- 6. Recall@K at 60,000 x 512 on the GPU
if want recall; then
  RC_ARGS="${RC_ARGS:---n 60000 --dim 512 --classes 600}"
  RC_DEV=cuda
  if [ "$DRY" = "1" ]; then RC_ARGS="--n 2000 --classes 40"; RC_DEV=cpu; fi
  # shellcheck disable=SC2086
  run_step "recall" "${RC_TIMEOUT:-150}" recall_cuda \
    "$PY" benchmarks/recall_cpu.py --device "$RC_DEV" --stem "$OUT/recall_cuda" $RC_ARGS
  RC_RC=$STEP_RC
fi

# ---------------------------------------------------------------- 7. AVSL distance + top-k on the GPU
if want avsl; then
  AV_ARGS="${AV_ARGS:---n 20000}"
  AV_DEV=cuda
  if [ "$DRY" = "1" ]; then AV_ARGS="--n 200 --nodes 64 --link-k 16 --topk 10"; AV_DEV=cpu; fi
  # shellcheck disable=SC2086
  run_step "avsl" "${AV_TIMEOUT:-240}" avsl_cuda \
    "$PY" benchmarks/avsl_cpu.py --device "$AV_DEV" --stem "$OUT/avsl_cuda" $AV_ARGS
  AV_RC=$STEP_RC
  CAM_ARGS=""; [ "$DRY" = "1" ] && CAM_ARGS="--dry-run"
  # shellcheck disable=SC2086
  run_step "avsl cam" "${CAM_TIMEOUT:-120}" avsl_cam_cuda \
    "$PY" benchmarks/avsl_cam.py --device "$AV_DEV" --stem "$OUT/avsl_cam_cuda" $CAM_ARGS
  [ $STEP_RC -ne 0 ] && AV_RC=$STEP_RC
  # the AVSL CUDA kernels' shared-memory knob (csrc/avsl/avsl_distance_cuda.cu): 128 KiB of hats per
  # block (32 pairs per tile, opt-in) against the default 48 KiB (8 pairs at R = 512), whymatch only
  # shellcheck disable=SC2086
  run_step "avsl smem 128k" "${AVK_TIMEOUT:-120}" avsl_cuda_smem128k \
    env WHYMATCH_AVSL_CUDA_SMEM=131072 "$PY" benchmarks/avsl_cpu.py --device "$AV_DEV" \
    --stem "$OUT/avsl_cuda_smem128k" --variants whymatch $AV_ARGS
  [ $STEP_RC -ne 0 ] && AV_RC=$STEP_RC
fi

# ---------------------------------------------------------------- 8. AVSL at SOP scale (60,502 x 60,502) on the GPU
if want sop; then
  SOP_ARGS="${SOP_ARGS:---time-budget 150 --timeout 190}"
  SOP_DEV=cuda
  if [ "$DRY" = "1" ]; then
    SOP_ARGS="--n 2000 --classes 400 --nodes 128 --link-k 32 --baseline-queries 200 --time-budget 20 --timeout 120"
    SOP_DEV=cpu
  fi
  # shellcheck disable=SC2086
  run_step "avsl sop" "${SOP_TIMEOUT:-420}" avsl_sop_cuda \
    "$PY" benchmarks/avsl_sop.py --device "$SOP_DEV" --stem "$OUT/avsl_sop_cuda" $SOP_ARGS
  SOP_RC=$STEP_RC
  [ -f "$OUT/avsl_sop_cuda.md" ] && cat "$OUT/avsl_sop_cuda.md" >> "$SUITE_LOG"
fi

# ---------------------------------------------------------------- 9. AVSL GPU paths at SOP scale (issue 19)
# The tensor-core path (fused 3xTF32 kernel) and the cuBLAS path (chunked torch.mm between the fused
# prologue / blend / epilogue kernels of csrc/avsl/avsl_fused_cuda.cu) forced with
# WHYMATCH_AVSL_GPU_PATH, each through avsl_sop.py's whymatch variant (60,502 x 60,502, 3 x 512
# nodes, k = 128), the tensor-core run beside the published slicing (sliced_torch, time budget,
# extrapolated). Predictions: benchmarks/results/avsl_sop_model.md. Cap 560 s (one device call):
# 2 x 130 + 15 (tensorcore + slicing) + 250 + 15 (cublas); a cuBLAS run that times out still logs
# its probe's estimate. Not in the default STEPS: SKIP_BUILD=1 STEPS=sop_paths.
if want sop_paths; then
  SP_DEV=cuda
  SP_TC_ARGS="${SP_TC_ARGS:---variants whymatch,sliced_torch --time-budget 100 --timeout 130}"
  SP_CB_ARGS="${SP_CB_ARGS:---variants whymatch --timeout 250}"
  if [ "$DRY" = "1" ]; then
    SP_DEV=cpu
    SP_TC_ARGS="--n 1000 --classes 200 --nodes 64 --link-k 16 --baseline-queries 100 --time-budget 10 --timeout 60"
    SP_CB_ARGS="--n 1000 --classes 200 --nodes 64 --link-k 16 --variants whymatch --timeout 60"
  fi
  # shellcheck disable=SC2086
  run_step "avsl sop tensorcore" "${SP_TC_TIMEOUT:-280}" avsl_sop_tensorcore \
    env WHYMATCH_AVSL_GPU_PATH=tensorcore "$PY" benchmarks/avsl_sop.py --device "$SP_DEV" \
    --stem "$OUT/avsl_sop_tensorcore" $SP_TC_ARGS
  SOP_RC=$((SOP_RC | STEP_RC))
  # shellcheck disable=SC2086
  run_step "avsl sop cublas" "${SP_CB_TIMEOUT:-270}" avsl_sop_cublas \
    env WHYMATCH_AVSL_GPU_PATH=cublas "$PY" benchmarks/avsl_sop.py --device "$SP_DEV" \
    --stem "$OUT/avsl_sop_cublas" $SP_CB_ARGS
  SOP_RC=$((SOP_RC | STEP_RC))
  for f in avsl_sop_tensorcore avsl_sop_cublas; do [ -f "$OUT/$f.md" ] && cat "$OUT/$f.md" >> "$SUITE_LOG"; done
fi

# ---------------------------------------------------------------- 10. the cuBLAS path without its fused kernels
# The same forced cuBLAS run with WHYMATCH_AVSL_CUBLAS_FUSED=0 (prologue and epilogue as torch ops,
# 54 passes over pairs x R instead of 8; model: 223 s against the fused form's 84 s on an H100),
# so that avsl_sop_cublas.md / avsl_sop_cublas_torch.md give the fusion's measured gain. Cap 270 s;
# a run that times out still logs its probe's estimate. Not in the default STEPS:
# SKIP_BUILD=1 STEPS=sop_cublas_torch.
if want sop_cublas_torch; then
  SCT_DEV=cuda
  SCT_ARGS="${SCT_ARGS:---variants whymatch --timeout 250}"
  if [ "$DRY" = "1" ]; then
    SCT_DEV=cpu
    SCT_ARGS="--n 1000 --classes 200 --nodes 64 --link-k 16 --variants whymatch --timeout 60"
  fi
  # shellcheck disable=SC2086
  run_step "avsl sop cublas torch ops" "${SCT_TIMEOUT:-270}" avsl_sop_cublas_torch \
    env WHYMATCH_AVSL_GPU_PATH=cublas WHYMATCH_AVSL_CUBLAS_FUSED=0 "$PY" benchmarks/avsl_sop.py --device "$SCT_DEV" \
    --stem "$OUT/avsl_sop_cublas_torch" $SCT_ARGS
  SOP_RC=$((SOP_RC | STEP_RC))
  [ -f "$OUT/avsl_sop_cublas_torch.md" ] && cat "$OUT/avsl_sop_cublas_torch.md" >> "$SUITE_LOG"
fi

log "done in $((SECONDS - START)) s (steps $STEPS): build $BUILD_RC, tests $TEST_RC, rise $BENCH_RC, saliency table $SAL_RC, soft mask $SM_RC, recall $RC_RC, avsl $AV_RC, sop $SOP_RC"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $SAL_RC -eq 0 ] && [ $SM_RC -eq 0 ] && [ $RC_RC -eq 0 ] && [ $AV_RC -eq 0 ] && [ $SOP_RC -eq 0 ]
