"""Host (CPU) time of one BatchNorm training step, layer by layer, on a tensor small enough
that the device work is negligible: where fastbn's per-call overhead goes compared with
torch.nn.BatchNorm's (BatchNorm1d/2d/3d picked by the shape's rank).

    python scripts/host_overhead.py [--device cuda] [--calls 2000] [--shape 32x64x8x8]

Each line: microseconds per call (median of 5 rounds of --calls calls, the device
synchronised only at the end of a round), and on CUDA the kernels launched per call.
"""
import argparse
import statistics
import sys
import time

import torch

import fastbn
from fastbn._ops import ops
from fastbn.testing import FASTBN, TORCH_BN, kind_of


def per_call_us(fn, calls, device):
    for _ in range(20):
        fn()
    rounds = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def kernels_per_call(fn, device):
    if device != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return f"{n:3d} kernels"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--shape", default="32x64x8x8")
    ap.add_argument("--trace", action="store_true",
                    help="also print torch.profiler's table (self CPU time) of 20 fastbn forward+backward steps")
    a = ap.parse_args(argv)
    dev = a.device
    shape = tuple(int(v) for v in a.shape.split("x"))
    C = shape[1]
    kind = kind_of(len(shape))
    ref = TORCH_BN[kind](C, device=dev)
    ours = FASTBN[kind](C, device=dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    dy = torch.randn(shape, device=dev)
    w, b = ours.weight, ours.bias
    rm, rv, nbt = ours.running_mean.clone(), ours.running_var.clone(), ours.num_batches_tracked.clone()
    out, mean, invstd, var = ops.forward_train(x, w, b, None, None, None, None, None, 1e-5, False)
    train = ops.forward_train.default

    def step(m):
        def fn():
            x.grad = None
            m.weight.grad = m.bias.grad = None
            m(x).backward(dy)
        return fn

    def fwd(m):
        def fn():
            m(x)
        return fn

    def op_with_autograd():
        train(x, w, b, None, rm, rv, nbt, 0.1, 1e-5, False)[0].backward(dy)

    no_grad_x = x.detach()
    cases = [
        ("torch  module forward+backward", step(ref)),
        ("fastbn module forward+backward", step(ours)),
        ("torch  module forward", fwd(ref)),
        ("fastbn module forward", fwd(ours)),
        ("fastbn op forward_train + backward", op_with_autograd),
        ("op forward_train (running stats, no grad)",
         lambda: train(no_grad_x, w.detach(), b.detach(), None, rm, rv, nbt, 0.1, 1e-5, False)),
        ("op backward_train", lambda: ops.backward_train(dy, x, mean, invstd, w, b, None, False,
                                                          [True, True, True, False])),
        ("torch.empty_like(x) (allocator floor)", lambda: torch.empty_like(x)),
    ]
    print(f"host_overhead: {dev} {tuple(shape)} float32, torch {torch.__version__}")
    for name, fn in cases:
        us = per_call_us(fn, a.calls, dev)
        print(f"{name:42s} {us:8.1f} us  {kernels_per_call(fn, dev)}", flush=True)
    if a.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        for name, m in (("fastbn", ours), ("torch", ref)):
            fn = step(m)
            for _ in range(20):
                fn()
            with profile(activities=activities, with_stack=False) as prof:
                for _ in range(20):
                    fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
            print(f"---- {name} module forward+backward, 20 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
