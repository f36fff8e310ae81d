"""Runs every fastbn CUDA kernel once per variant on small tensors (for compute-sanitizer):
forward train/eval, running-stat update, backward train/eval, the split ops, for every
dtype, both layouts, vectorised and scalar paths, with and without relu/residual. Checks
each result against fastbn's CPU kernels and exits non-zero on a mismatch."""
import sys

import torch

import fastbn  # noqa: F401  (registers the ops)
from fastbn import ops

TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def main():
    if not torch.cuda.is_available():
        print("exercise_kernels: no CUDA device")
        return 1
    torch.manual_seed(0)
    bad = 0
    shapes = [((4, 8, 8, 8), False), ((4, 6, 5, 5), False), ((3, 8, 4, 4), True), ((5, 6, 3, 3), True), ((9, 40), False),
              ((2, 3, 2, 2, 3), True)]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for shape, cl in shapes:
            x = torch.randn(shape, dtype=acc).to(dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
            C = shape[1]
            r = torch.randn_like(x)
            dy = torch.randn_like(x)
            w, b = torch.rand(C, dtype=acc) + 0.5, torch.randn(C, dtype=acc)
            rm, rv = torch.randn(C, dtype=acc), torch.rand(C, dtype=acc) + 0.5
            for relu, res in ((False, None), (True, r)):
                def run(dev):
                    t = lambda v: None if v is None else v.to(dev)  # noqa: E731
                    y, mean, invstd, var = ops.forward_train(t(x), t(w), t(b), t(res), 1e-5, relu)
                    rm2, rv2 = t(rm).clone(), t(rv).clone()
                    ops.update_running_stats(rm2, rv2, mean, var, 0.1, x.numel() // C)
                    ye = ops.forward_eval(t(x), t(rm), t(rv), t(w), t(b), t(res), 1e-5, relu)
                    gt = ops.backward_train(t(dy), t(x), mean, invstd, t(w), t(b), t(res), relu, [True, True, True, True])
                    ge = ops.backward_eval(t(dy), t(x), t(rm), t(rv), t(w), t(b), t(res), 1e-5, relu,
                                           [True, True, True, True])
                    s1, s2 = ops.backward_reduce(t(dy), t(x), mean, invstd, t(w), t(b), t(res), relu)
                    gx, gr = ops.backward_elemt(t(dy), t(x), mean, invstd, t(w), t(b), t(res), relu, s1, s2,
                                                x.numel() // C, [True, True])
                    m2, v2 = ops.batch_stats(t(x))
                    mm = ops.merge_stats(t(torch.tensor([3, 5])), torch.stack([m2, m2]), torch.stack([v2, v2]), 1e-5)
                    yn = ops.normalize(t(x), mean, invstd, t(w), t(b), t(res), relu)
                    return [y, mean, invstd, var, rm2, rv2, ye, *gt, *ge, s1, s2, gx, gr, m2, v2, *mm, yn]

                cpu, gpu = run("cpu"), run("cuda")
                torch.cuda.synchronize()
                for i, (a, e) in enumerate(zip(gpu, cpu)):
                    if e.numel() == 0:
                        continue
                    tol = TOL[e.dtype] * max(1.0, e.abs().max().item())
                    err = (a.cpu().double() - e.double()).abs().max().item()
                    if not err <= tol:
                        bad += 1
                        print(f"MISMATCH {dtype} {shape} cl={cl} relu={relu} output {i}: {err:.3g} > {tol:.3g}")
    print(f"exercise_kernels: {'OK' if bad == 0 else f'{bad} mismatches'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
