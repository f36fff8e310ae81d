#!/usr/bin/env bash
# GPU check, in named steps sized for a short GPU lease (commands of at most 10 minutes, no
# network, few log files). Each step writes one log, $LOG/<step>.log, prints one summary line
# and appends it to $LOG/summary.txt; the exit status is non-zero if any step failed.
#
#   bash scripts/gpu_check.sh [STEP ...]        default: build tests sanitize models bench
#
# The whole command stops itself within $BUDGET seconds (default 570, inside a 10-minute
# command): each step is cut at what is left (and at $STEP_TIMEOUT, default 540), and a step
# with under a minute left is not started. Steps (expected time on one H100 with 16 cores):
#   build      build fastbn in place with its CUDA kernels for this GPU's architecture,
#              check that it loads and sees the GPU                                 (~2-3 min)
#   tests      pytest: every CUDA test (CUDA variants of the device-parametrised tests and
#              tests/test_cuda.py: kernel paths, determinism, > 2^31 elements, streams,
#              CUDA-graph capture)                                                     (~3-5 min)
#   sanitize   compute-sanitizer over scripts/exercise_kernels.py (every kernel path of the
#              emulator's matrix: multi-split reductions, scalar fallbacks, misaligned
#              views), with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds accesses hit
#              unallocated memory: memcheck (all variants), racecheck and initcheck (one
#              variant each, initcheck without output poisoning)                      (~4-8 min)
#              (memcheck, racecheck, initcheck also run alone as steps of those names)
#   models     scripts/gpu_models.py: torchvision resnet50 (+ timm resnet50d if installed)
#              converted with fastbn.convert vs unconverted, float32 and autocast float16
#              + channels_last, losses / gradients / running statistics compared    (~1-2 min)
#   bench      benchmarks/bench.py --quick on the GPU ($BENCH_ARGS replaces the arguments;
#              results JSON/CSV/PNG go to $LOG)                                        (~2-4 min)
#   emu        the CPU emulator suite (tests/test_cuda_emu*.py) on this machine     (~3-5 min)
# A lease of 30 minutes fits: `build tests` (one command), `sanitize`, `models bench`.
#
# Logs go to $OUT (the device tool's output folder) or ./gpu_check_logs.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-$PWD/gpu_check_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
DEADLINE=$((SECONDS + ${BUDGET:-570}))
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests sanitize models bench)
failed=0

summary() {  # summary <step> <rc> <seconds> <text>
  local verdict=PASS
  [ "$2" -ne 0 ] && verdict="FAIL (rc=$2$([ "$2" -eq 124 ] && echo ', timed out'))"
  local line="STEP $1: $verdict in $3 s -- $4"
  echo "$line" | tee -a "$LOG/summary.txt"
  [ "$2" -ne 0 ] && failed=1
  return 0
}

# Seconds a step may still run: what is left of the budget (less a margin for the summary),
# at most $STEP_TIMEOUT, divided by $1 (default 1).
left() {
  local t=$((DEADLINE - SECONDS - 10))
  [ "$t" -gt "$STEP_TIMEOUT" ] && t=$STEP_TIMEOUT
  echo $((t / ${1:-1}))
}

# A sanitizer tool over the kernel exerciser; prints its verdict line.
sanitizer_run() {  # sanitizer_run <tool> <exerciser args...>
  local tool=$1
  shift
  local filter=()
  # memcheck/racecheck: only fastbn's kernels (initcheck must also see the kernels that
  # initialise the inputs, so it watches everything).
  if [ "$tool" != initcheck ] && "$SAN" --help 2>&1 | grep -q -- "--kernel-name"; then
    filter=(--kernel-name kns=fastbn)
  fi
  local extra=()
  [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
  echo "==== compute-sanitizer --tool $tool ${filter[*]} ${extra[*]} exercise_kernels.py $*"
  local t0=$SECONDS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(left "${SHARE:-1}")" "$SAN" --tool "$tool" --error-exitcode 3 \
    "${filter[@]}" "${extra[@]}" "$PY" scripts/exercise_kernels.py "$@"
  local rc=$?
  echo "==== $tool: rc=$rc in $((SECONDS - t0)) s"
  return $rc
}

step_build() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  fi
  if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit nvcc itself uses (PyTorch's guess can miss it)
    local nvcc
    nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
    [ -n "$nvcc" ] && CUDA_HOME=$("$nvcc" --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    [ -n "${CUDA_HOME:-}" ] && export CUDA_HOME
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  FASTBN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "$(left)" "$PY" setup.py build_ext --inplace || return $?
  "$PY" -c "import fastbn, torch; assert fastbn.built_with_cuda() and torch.cuda.is_available(); \
print('fastbn CUDA build OK on', torch.cuda.get_device_name())"
}
summary_build() { tail -1 "$LOG/build.log"; }

step_tests() {
  timeout "$(left)" "$PY" -m pytest -q -rs -p no:cacheprovider tests -k "cuda and not emu" --durations=10
}
summary_tests() { grep -E "passed|failed|error" "$LOG/tests.log" | tail -1; }

step_memcheck() { sanitizer_run memcheck; }
step_racecheck() { sanitizer_run racecheck --quick; }
step_initcheck() { sanitizer_run initcheck --quick --no-poison; }
step_sanitize() {  # the three tools share what is left: a third, then half, then the rest
  local rc=0
  SHARE=3 step_memcheck || rc=1
  SHARE=2 step_racecheck || rc=1
  SHARE=1 step_initcheck || rc=1
  return $rc
}
summary_sanitize() { grep -E "^==== (memcheck|racecheck|initcheck):|ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/sanitize.log" | tr '\n' ' '; }
summary_memcheck() { grep -E "ERROR SUMMARY|exercise_kernels:" "$LOG/memcheck.log" | tr '\n' ' '; }
summary_racecheck() { grep -E "RACECHECK SUMMARY|exercise_kernels:" "$LOG/racecheck.log" | tr '\n' ' '; }
summary_initcheck() { grep -E "ERROR SUMMARY|exercise_kernels:" "$LOG/initcheck.log" | tr '\n' ' '; }

step_models() { timeout "$(left)" "$PY" scripts/gpu_models.py --device cuda; }
summary_models() { grep -E "^(PASS|FAIL|SKIP)|gpu_models:" "$LOG/models.log" | cut -c1-160 | tr '\n' ';'; }

step_bench() {
  local args=${BENCH_ARGS:---quick}
  local chart=()
  "$PY" -c "import matplotlib" 2>/dev/null || chart=(--no-chart)
  # shellcheck disable=SC2086
  timeout "$(left)" "$PY" benchmarks/bench.py --device cuda $args --out-dir "$LOG" "${chart[@]}"
}
summary_bench() { grep -iE "geomean|wrote" "$LOG/bench.log" | tail -4 | tr '\n' ' '; }

step_emu() {
  timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emu.py tests/test_cuda_emu_seeded_bugs.py
}
summary_emu() { grep -E "passed|failed" "$LOG/emu.log" | tail -1; }

for s in "${STEPS[@]}"; do
  if ! declare -F "step_$s" >/dev/null; then
    echo "gpu_check: unknown step '$s' (steps: build tests sanitize memcheck racecheck initcheck models bench emu)"
    exit 2
  fi
done
for s in "${STEPS[@]}"; do
  case $s in
    build | emu) ;;
    *)
      if ! "$PY" -c "import fastbn, torch; assert fastbn.built_with_cuda() and torch.cuda.is_available()" 2>/dev/null; then
        summary "$s" 1 0 "fastbn is not built with CUDA here (run the build step first)"
        continue
      fi
      ;;
  esac
  if [[ $s =~ ^(sanitize|memcheck|racecheck|initcheck)$ ]] && [ -z "$SAN" ]; then
    summary "$s" 1 0 "compute-sanitizer not found"
    continue
  fi
  if [ "$(left)" -lt 60 ]; then
    summary "$s" 1 0 "not started: under a minute of this command's budget left (run it in its own command)"
    continue
  fi
  echo "---- $s"
  t0=$SECONDS
  "step_$s" >"$LOG/$s.log" 2>&1
  rc=$?
  tail -n 3 "$LOG/$s.log"
  summary "$s" $rc $((SECONDS - t0)) "$("summary_$s" 2>/dev/null)"
done
echo "overall: $([ $failed -eq 0 ] && echo PASS || echo FAIL) (logs in $LOG)"
exit $failed
