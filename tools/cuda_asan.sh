#!/usr/bin/env bash
# AddressSanitizer run of the emulated CUDA kernels: the OS-thread back end (ASan follows
# std::thread; it does not follow ucontext fibers) built with -fsanitize=address, under the whole
# emulated test file. Run it before landing a kernel change; it writes
# benchmarks/results/cuda_asan.md (what ran, how long, clean or not) and exits non-zero when not clean.
#
#   bash tools/cuda_asan.sh [extra pytest args, e.g. -k avsl]
#   WHYMATCH_ASAN_OUT=FILE.md bash tools/cuda_asan.sh -k tensorcore    # a partial run, written elsewhere
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${WHYMATCH_ASAN_OUT:-benchmarks/results/cuda_asan.md}
# every emulated kernel test file (test_emulated_checks.py plants bugs on purpose: not here)
TESTS="tests/test_emulated_kernels.py tests/test_emulated_findings.py tests/test_emulated_barriers.py tests/test_emulated_tensorcore.py tests/test_emulated_avsl_fused.py"
LOG=$(mktemp /tmp/wm_cuda_asan.XXXXXX.log)
t0=$(date +%s)
SO=$($PY tests/cuda_emulation/build.py --variant asan 2>>"$LOG" | tail -1) || { cat "$LOG"; exit 1; }
t1=$(date +%s)
LIBASAN=$(g++ -print-file-name=libasan.so)
# libstdc++ preloaded too: with libasan alone, a C++ exception thrown by the module (a kernel check's
# error) aborts the process without a word, because ASan's __cxa_throw interceptor cannot find the real one
LIBSTDCXX=$(g++ -print-file-name=libstdc++.so.6)
# detect_leaks=0: CPython and torch keep allocations alive at exit by design
# WHYMATCH_EMU_TIMEOUT_S: a barrier that waits this long is a deadlock (threads are slow under ASan)
env LD_PRELOAD="$LIBASAN $LIBSTDCXX" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 \
    WHYMATCH_EMU_MODULE="$SO" WHYMATCH_EMU_TIMEOUT_S=120 OMP_NUM_THREADS=1 \
    $PY -m pytest -q -p no:cacheprovider -m emulated $TESTS "$@" >>"$LOG" 2>&1
rc=$?
t2=$(date +%s)
summary=$(grep -E "passed|failed|error" "$LOG" | tail -1)
asan_reports=$(grep -c "ERROR: AddressSanitizer" "$LOG")
if [ $rc -eq 0 ] && [ "$asan_reports" -eq 0 ]; then verdict="clean"; else verdict="NOT clean (exit $rc, $asan_reports AddressSanitizer reports)"; fi
{
  echo "# AddressSanitizer run of the emulated CUDA kernels"
  echo
  echo "Produced by \`bash tools/cuda_asan.sh $*\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores,"
  echo "checkout $(git rev-parse --short HEAD)$(git status --porcelain csrc | grep -q . && echo ' with uncommitted csrc/ edits')."
  echo
  echo "- What ran: the tests of $TESTS (marker emulated${*:+, selected by: $*}) against the emulated"
  echo "  module built with the OS-thread back end (one std::thread per CUDA thread) and"
  echo "  \`-fsanitize=address -O1 -g\`, python run with LD_PRELOAD=libasan.so + libstdc++.so.6, detect_leaks=0."
  echo "- Build: $((t1 - t0)) s; tests: $((t2 - t1)) s."
  echo "- pytest: ${summary:-no summary line (see the log)}"
  echo "- AddressSanitizer reports: $asan_reports"
  echo "- Result: **$verdict**"
  if [ "$verdict" != "clean" ]; then
    echo; echo '```'; grep -A30 "ERROR: AddressSanitizer" "$LOG" | head -60; grep -E "^(FAILED|ERROR)" "$LOG" | head -20; echo '```'
  fi
} > "$OUT"
cat "$OUT"
echo "log: $LOG"
[ "$verdict" = "clean" ]
