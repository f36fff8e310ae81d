#!/usr/bin/env bash
# GPU check, in named steps sized for a short GPU lease (commands of at most 10 minutes, no
# network, few log files). Each step writes one log, $LOG/<step>.log, prints one summary line
# and appends it to $LOG/summary.txt; the exit status is non-zero if any step failed.
#
#   bash scripts/gpu_check.sh [STEP ...]        default: build tests sanitize models bench
#
# A STEP may be a group joined with "+" (e.g. tests+memcheck+models): its steps run at the same
# time on the one GPU, which suits correctness steps (never put bench in a group).
#
# The whole command stops itself within $BUDGET seconds (default 570, inside a 10-minute
# command): each step is cut at what is left (and at $STEP_TIMEOUT, default 540), and a step
# with under a minute left is not started. Steps (times seen on one H100 with 16 cores, 2026-11-22;
# steps in a group were sharing the GPU):
#   build      build fastbn in place with its CUDA kernels for this GPU's architecture, with
#              /usr/bin's gcc/g++ where present (FASTBN_KEEP_CXX=1 keeps $CC/$CXX); check that
#              the module links libstdc++ dynamically, loads, sees the GPU and raises a
#              formatted error as a Python exception                                    (~50 s)
#   tests      pytest: every CUDA test (CUDA variants of the device-parametrised tests and
#              tests/test_cuda.py: kernel paths, determinism, > 2^31 elements, streams,
#              CUDA-graph capture); TEST_WORKERS=6 runs 6 pytest-xdist workers    (~100 s with 6)
#   sanitize   compute-sanitizer over scripts/exercise_kernels.py (every kernel path of the
#              emulator's matrix: multi-split reductions, scalar fallbacks, misaligned
#              views), with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds accesses hit
#              unallocated memory: memcheck (all variants; MEMCHECK_ARGS=--quick for one),
#              racecheck and initcheck (one variant each, initcheck without output
#              poisoning); alone as steps memcheck, racecheck, initcheck     (~2-3 min each)
#   models     scripts/gpu_models.py: torchvision resnet50 (+ timm resnet50d if installed)
#              converted with fastbn.convert vs unconverted, float32 and autocast float16
#              + channels_last, losses / gradients / running statistics compared       (~1 min)
#   bench      benchmarks/bench.py --quick on the GPU ($BENCH_ARGS replaces the arguments,
#              e.g. the full grid as below, ~4 min; results JSON/CSV/PNG go to $LOG)
#   profile    Nsight Compute over fastbn's kernels in scripts/gpu_profile.py ($PROFILE_ARGS:
#              its cases; $NCU_COUNT kernels, default 14)                              (~1-2 min)
#   emu        the CPU emulator suite (tests/test_cuda_emu*.py) on this machine     (~3-5 min)
# A lease of 30 minutes fits, one command each:
#   TEST_WORKERS=6 gpu_check.sh build tests+memcheck+racecheck+initcheck+models     (~5 min)
#   BENCH_ARGS="--budget-s 290 --compile-policy fwdbwd-float32 --reps 20 --no-chart" \
#     gpu_check.sh build bench                          (~5 min: the 387-row grid took 210 s)
#   gpu_check.sh build profile                                                      (~3 min)
# At most 8 files come back from a device command: name few steps in one command (the bench
# step alone writes 4).
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
  # The system compiler where there is one (FASTBN_KEEP_CXX=1 keeps $CC/$CXX): the GPU image's
  # /opt/gcc wrapper links a static copy of libstdc++ into the module, which then crashes
  # as soon as it formats an error message (an ostream in a copy whose locale was never set up).
  if [ -z "${FASTBN_KEEP_CXX:-}" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
  fi
  echo "CC=${CC:-default} CXX=${CXX:-default} ($("${CXX:-g++}" --version | head -1))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  FASTBN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "$(left)" "$PY" setup.py build_ext --inplace || return $?
  local so
  so=$(ls fastbn/_C*.so | head -1)
  if nm -D --defined-only "$so" | grep -q "_ZNSo9_M_insertIlEERSoT_"; then
    echo "$so defines libstdc++'s own symbols (std::ostream::_M_insert<long>): a static libstdc++ was linked in"
    return 1
  fi
  # Loads, sees the GPU, and raises a formatted error as a Python exception (not a crash).
  "$PY" -c "import fastbn, torch
assert fastbn.built_with_cuda() and torch.cuda.is_available()
try:
    fastbn.ops.forward_train(torch.randn(5, device='cuda'), None, None, None, None, None, None, None, 1e-5, False)
    raise SystemExit('a 1-D input was accepted')
except ValueError as e:
    assert 'got 1D input' in str(e), e
print('fastbn CUDA build OK on', torch.cuda.get_device_name())"
}
summary_build() { tail -1 "$LOG/build.log"; }

step_tests() {  # $TEST_WORKERS > 1: that many pytest-xdist workers share the GPU (when xdist is there)
  local par=()
  [ "${TEST_WORKERS:-1}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null && par=(-n "$TEST_WORKERS")
  timeout "$(left)" "$PY" -m pytest -q -rfEs -p no:cacheprovider "${par[@]}" tests -k "cuda and not emu" --durations=10
}
summary_tests() { grep -E "passed|failed|error" "$LOG/tests.log" | tail -1; }

step_memcheck() { sanitizer_run memcheck ${MEMCHECK_ARGS:-}; }  # MEMCHECK_ARGS=--quick: one variant
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

# Nsight Compute over fastbn's kernels in a few steps of scripts/gpu_profile.py (its default
# cases, or $PROFILE_ARGS): duration, DRAM throughput, occupancy, warp stalls per kernel.
step_profile() {
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
  [ -z "$ncu" ] && { echo "ncu not found"; return 1; }
  # shellcheck disable=SC2086
  timeout "$(left)" "$ncu" --target-processes all -k "regex:(stats|normalize|grad|merge_stats)_" \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    -c "${NCU_COUNT:-14}" "$PY" scripts/gpu_profile.py ${PROFILE_ARGS:-}
}
summary_profile() { grep -cE "^  void .*_kernel" "$LOG/profile.log" | sed 's/$/ kernels profiled/'; }

step_emu() {
  timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emu.py tests/test_cuda_emu_seeded_bugs.py
}
summary_emu() { grep -E "passed|failed" "$LOG/emu.log" | tail -1; }

# Runs one step with its log and prints its summary line.
run_step() {  # run_step <step>
  local s=$1 t0=$SECONDS rc
  case $s in
    build | emu) ;;
    *)
      if ! "$PY" -c "import fastbn, torch; assert fastbn.built_with_cuda() and torch.cuda.is_available()" 2>/dev/null; then
        summary "$s" 1 0 "fastbn is not built with CUDA here (run the build step first)"
        return 1
      fi
      ;;
  esac
  if [[ $s =~ ^(sanitize|memcheck|racecheck|initcheck)$ ]] && [ -z "$SAN" ]; then
    summary "$s" 1 0 "compute-sanitizer not found"
    return 1
  fi
  if [ "$(left)" -lt 60 ]; then
    summary "$s" 1 0 "not started: under a minute of this command's budget left (run it in its own command)"
    return 1
  fi
  echo "---- $s"
  "step_$s" >"$LOG/$s.log" 2>&1
  rc=$?
  tail -n 3 "$LOG/$s.log" | cut -c1-300
  summary "$s" $rc $((SECONDS - t0)) "$("summary_$s" 2>/dev/null)"
  return $rc
}

for group in "${STEPS[@]}"; do
  for s in ${group//+/ }; do
    if ! declare -F "step_$s" >/dev/null; then
      echo "gpu_check: unknown step '$s' (steps: build tests sanitize memcheck racecheck initcheck models bench profile emu;" \
        "join steps with + to run them at the same time)"
      exit 2
    fi
  done
done
for group in "${STEPS[@]}"; do
  if [[ $group != *+* ]]; then
    run_step "$group" || failed=1
    continue
  fi
  # A group "a+b+c": the steps run at the same time (correctness steps sharing the GPU; never
  # a timing step), each with its own log; the group ends when the last one does.
  pids=()
  for s in ${group//+/ }; do
    run_step "$s" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
done
echo "overall: $([ $failed -eq 0 ] && echo PASS || echo FAIL) (logs in $LOG)"
exit $failed
