#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU, torch with CUDA, nvcc and pytest (no network
# needed), in one command:
#   1. builds fastbn in place with its CUDA kernels,
#   2. runs the whole test suite (CUDA variants included, slow tests too),
#   3. runs compute-sanitizer memcheck and racecheck over scripts/exercise_kernels.py,
#   4. runs the benchmark in quick mode.
# Logs go to $OUT (or ./gpu_check_logs); a short summary is printed last. Exit status is
# non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-$PWD/gpu_check_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
declare -A result

step() {  # step <name> <log file> <command...>
  local name=$1 log=$2
  shift 2
  echo "---- $name"
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  tail -n 5 "$log"
  result[$name]="rc=$rc ($((SECONDS - t0)) s)"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1 | tee "$LOG/device.txt"
step build "$LOG/build.log" env FASTBN_CUDA=1 "$PY" setup.py build_ext --inplace
build_rc=$?
if [ $build_rc -eq 0 ]; then
  "$PY" -c "import fastbn, torch; assert fastbn.built_with_cuda() and torch.cuda.is_available(); print('fastbn CUDA build OK on', torch.cuda.get_device_name())" >>"$LOG/build.log" 2>&1 || build_rc=1
  result[build]="rc=$build_rc"
fi
if [ $build_rc -eq 0 ]; then
  step tests "$LOG/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$SAN" ]; then
    step memcheck "$LOG/memcheck.log" "$SAN" --tool memcheck --error-exitcode 3 "$PY" scripts/exercise_kernels.py
    step racecheck "$LOG/racecheck.log" "$SAN" --tool racecheck --racecheck-report all --error-exitcode 3 "$PY" scripts/exercise_kernels.py
  else
    result[memcheck]="skipped (no compute-sanitizer)"
    result[racecheck]="skipped (no compute-sanitizer)"
  fi
  step bench "$LOG/bench.log" "$PY" benchmarks/bench.py --quick --device cuda --out-dir "$LOG"
fi

echo
echo "==== fastbn GPU check summary ($(cat "$LOG/device.txt"))"
for k in build tests memcheck racecheck bench; do
  printf '%-10s %s\n' "$k" "${result[$k]:-not run}"
done
grep -E "passed|failed" "$LOG/tests.log" 2>/dev/null | tail -1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/memcheck.log" "$LOG/racecheck.log" 2>/dev/null
grep -iE "geomean|summary|slowest" "$LOG/bench.log" 2>/dev/null | tail -5
fail=0
for k in build tests memcheck racecheck bench; do
  case "${result[$k]:-rc=1}" in rc=0*|skipped*) ;; *) fail=1 ;; esac
done
echo "overall: $([ $fail -eq 0 ] && echo PASS || echo FAIL)"
exit $fail
