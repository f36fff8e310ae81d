#!/usr/bin/env bash
# CI step: fastbn's full CUDA build, checked on a machine without a GPU.
#
#  1. A venv (FASTBN_CUDA_VENV, default /tmp/fastbn-cuda-venv; reused when it already has the
#     right torch) with the CUDA 13.0 build of torch==2.14.1 and torchvision==0.29.1 (both run
#     on the CPU) and the test suite's packages.
#  2. A copy of this checkout (tracked and untracked-but-not-ignored files) in FASTBN_CUDA_WORK
#     (default /tmp/fastbn-cuda-build), so the CPU build in the checkout is left alone.
#  3. Every .cu file through plain nvcc (to PTX for sm_90, without torch's flags: no torch
#     header, no --expt-relaxed-constexpr), so the kernels stay buildable outside PyTorch.
#  4. The build: FASTBN_CUDA=1, sm_80 and sm_90, `-Xptxas -v`; the whole log is kept in the
#     work dir, the per-kernel registers/stack/spills are printed (scripts/ptxas_report.py).
#  5. The module imports, `fastbn.built_with_cuda()` is True, and the test suite runs against
#     this build with FASTBN_EXPECT_CUDA=1 (tests/test_build.py then requires a CUDA kernel for
#     every op; CUDA tests skip without a GPU; tests/test_models.py trains torchvision's
#     resnet18; FASTBN_PTXAS_LOG=the build log, so tests/test_plan.py checks the launch plan's
#     waves and the kernels' registers and spills against this build's ptxas report). The CUDA emulator tests are left out: they build their own module from the
#     same sources and ran in the main suite.
# Extra arguments go to pytest. Exit status: non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FASTBN_CUDA_VENV:-/tmp/fastbn-cuda-venv}
WORK=${FASTBN_CUDA_WORK:-/tmp/fastbn-cuda-build}
TORCH_REQ=torch==2.14.1
VISION_REQ=torchvision==0.29.1
ARCHS=${FASTBN_CUDA_ARCHS:-8.0;9.0}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "ci_cuda_build: nvcc not found (set NVCC); the CUDA build cannot be checked" >&2
  exit 1
fi
# The toolkit root: CUDA_HOME if set, else the one the nvcc actually run belongs to
# (/usr/local/bin/nvcc may be a wrapper script, which torch's own guess would take for it).
CUDA_ROOT=${CUDA_HOME:-$("$NVCC" --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}
CUDA_HOME=$(readlink -f "${CUDA_ROOT:-/usr/local/cuda}")
export CUDA_HOME
step() { echo "=== ci_cuda_build: $* ($(date -u +%H:%M:%S))"; }
t_start=$(date +%s)

step "venv $VENV with $TORCH_REQ $VISION_REQ"
PY=$VENV/bin/python
want=${TORCH_REQ#torch==}
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not torch.__version__.startswith('$want'))" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q "$TORCH_REQ" "$VISION_REQ"
fi
PYTHON=$PY bash "$ROOT/scripts/setup.sh" --deps-only  # the test suite's packages
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, '(CUDA', torch.version.cuda, ') torchvision', torchvision.__version__)"
t_venv=$(date +%s)

step "copy of the checkout in $WORK/src"
rm -rf "$WORK"
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$WORK/src"
cd "$WORK/src"

step "plain nvcc --ptx -arch=sm_90 (no torch flags): csrc/cuda/*.cu"
for f in csrc/cuda/*.cu; do
  if ! "$NVCC" --ptx -std=c++17 -arch=sm_90 -I csrc "$f" -o /dev/null; then
    echo "ci_cuda_build: FAILED: $f does not compile with plain nvcc"
    exit 1
  fi
done

step "build: FASTBN_CUDA=1 TORCH_CUDA_ARCH_LIST='$ARCHS' -Xptxas -v (CUDA_HOME=$CUDA_HOME)"
log=$WORK/build.log
if ! FASTBN_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" FASTBN_NVCC_FLAGS="-Xptxas -v" MAX_JOBS=$(nproc) \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  grep -E -B2 -A8 "error|Error" "$log" | head -80
  echo "ci_cuda_build: FAILED: the CUDA build (log: $log)"
  exit 1
fi
t_build=$(date +%s)
echo "built in $((t_build - t_venv)) s; ptxas resource report (registers, stack frame, spill stores/loads):"
"$PY" "$ROOT/scripts/ptxas_report.py" "$log"

step "import"
"$PY" -c "
import torch, fastbn
assert fastbn.built_with_cuda(), 'fastbn was built without its CUDA kernels'
print('fastbn', fastbn.__file__, '| built_with_cuda:', fastbn.built_with_cuda(), '| CUDA available:', torch.cuda.is_available())
"

step "tests against the CUDA build"
t_tests=$(date +%s)
FASTBN_EXPECT_CUDA=1 FASTBN_PTXAS_LOG=$log PYTHONPATH=$WORK/src "$PY" -m pytest -q -rs -p no:cacheprovider tests \
  --ignore=tests/test_cuda_emu.py --ignore=tests/test_cuda_emu_seeded_bugs.py "$@"
t_end=$(date +%s)
echo "ci_cuda_build: PASS in $((t_end - t_start)) s (venv $((t_venv - t_start)) s, copy + build $((t_build - t_venv)) s," \
  "tests $((t_end - t_tests)) s)"
