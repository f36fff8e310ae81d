#!/usr/bin/env bash
# Quick check, no GPU and no CUDA build of torch needed: compiles every CUDA kernel file with
# nvcc for sm_80 and sm_90 and syntax-checks the CUDA binding against the installed torch's
# headers. Prints the per-kernel resource report (scripts/ptxas_report.py) and fails on any
# compile error. CI runs the full CUDA build instead (scripts/ci_cuda_build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "cuda_compile_check: nvcc not found; skipping the CUDA compile check" >&2
  exit 0
fi
# The flags PyTorch's CUDAExtension build passes to nvcc (half/bf16 operator macros etc.).
TORCH_NVCC_FLAGS=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join(c.COMMON_NVCC_FLAGS))" 2>/dev/null || true)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
pids=()
for arch in 80 90; do
  for f in csrc/cuda/*.cu; do
    name=$(basename "$f" .cu)
    ( "$NVCC" -c $TORCH_NVCC_FLAGS -std=c++17 -O3 -lineinfo -arch="sm_$arch" -Xptxas -v -I csrc "$f" -o "$out/$name.$arch.o" \
        >"$out/$name.$arch.log" 2>&1 || echo failed >"$out/$name.$arch.failed" ) &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
for arch in 80 90; do
  for f in csrc/cuda/*.cu; do
    name=$(basename "$f" .cu)
    if [ -e "$out/$name.$arch.failed" ]; then
      cat "$out/$name.$arch.log"
      echo "FAILED: $f for sm_$arch"
      status=1
    fi
  done
done
if [ $status -eq 0 ]; then
  python3 scripts/ptxas_report.py "$out"/*.log
fi
# The toolkit's headers: CUDA_HOME if set, else next to the nvcc actually run.
CUDA_ROOT=${CUDA_HOME:-$("$NVCC" --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
CUDA_INC=$CUDA_ROOT/include
TORCH_INC=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
echo "=== g++ -fsyntax-only csrc/cuda/bn_cuda_binding.cpp (CUDA backend binding)"
if ! g++ -std=c++20 -fsyntax-only -Wall -DFASTBN_WITH_CUDA $TORCH_INC -I"$CUDA_INC" -I csrc \
    csrc/cuda/bn_cuda_binding.cpp; then
  echo "FAILED: csrc/cuda/bn_cuda_binding.cpp"
  status=1
fi
if [ $status -eq 0 ]; then echo "cuda_compile_check: all CUDA sources compile (sm_80, sm_90)"; fi
exit $status
