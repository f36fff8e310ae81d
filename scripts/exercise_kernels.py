"""Runs every fastbn CUDA kernel path on the GPU and compares every op with fastbn's CPU
kernels: the path matrix of the CPU emulator's tests (tests/cuda_emu/emu_harness.py), i.e.
every dtype x planar / channels-last x vector / scalar / misaligned (storage offset of one
element), 2-D to 5-D inputs, reductions split over several blocks and merged, C = 1 to 4096,
with and without affine parameters, residual and relu. Meant for compute-sanitizer
(scripts/gpu_check.sh sanitize); exits non-zero on a mismatch.

    python scripts/exercise_kernels.py [--quick] [--no-poison]

--quick      one variant per case (fused add+relu, which reaches every kernel)
--no-poison  leave outputs and workspaces uninitialised (for initcheck; by default they are
             filled with NaN / 0xFF, so an unwritten element shows as a mismatch)
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "cuda_emu"))
import emu_harness as H  # noqa: E402

import fastbn  # noqa: E402,F401  (registers the ops)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-poison", action="store_true")
    ap.add_argument("--device", default="cuda", help="default cuda (cpu runs the same checks on the CPU backend)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("exercise_kernels: no CUDA device")
        return 1
    ops = torch.ops.fastbn
    cases = [c for cs in H.PATHS.values() for c in cs] + [H.Case((2, 4096, 2, 3))]
    bad = 0
    calls = []  # the ops run_ops called on the GPU side
    t0 = time.time()
    for dtype in H.DTYPES:
        for i, case in enumerate(cases):
            cpu = H.make_inputs(case, dtype, 100 + i)
            dev = H.make_inputs(case, dtype, 100 + i, a.device)
            for variant in H.variants(dtype)[1:2] if a.quick else H.variants(dtype):
                ref = H.reference_stats(cpu, case, variant)
                expected = H.run_ops(ops, cpu, case, variant, ref)
                got = H.run_ops(ops, dev, case, variant, [r.to(a.device) for r in ref], calls.append,
                                poison=not a.no_poison)
                if a.device == "cuda":
                    torch.cuda.synchronize()
                what = f"{case.id} {dtype} {variant[0]}"
                try:
                    H.compare({k: v.cpu() for k, v in got.items()}, expected, case.count, what)
                except AssertionError as e:
                    bad += 1
                    print(f"MISMATCH {what}: {str(e).splitlines()[0]}", flush=True)
    print(f"exercise_kernels: {len(calls)} op calls on {len(cases)} cases x {len(H.DTYPES)} dtypes in "
          f"{time.time() - t0:.0f} s, {'OK' if bad == 0 else f'{bad} mismatches'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
