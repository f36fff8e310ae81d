"""Host (CPU) time of one BatchNorm training step, layer by layer, on a tensor small enough
that the device work is negligible: where fastbn's per-call overhead goes compared with
torch.nn.BatchNorm2d's.

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
from fastbn._autograd import BatchNormTrain
from fastbn._ops import ops


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
    ref = torch.nn.BatchNorm2d(C, device=dev)
    ours = fastbn.BatchNorm2d(C, device=dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    dy = torch.randn(shape, device=dev)
    w, b = ours.weight, ours.bias
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    out, mean, invstd, var = ops.forward_train(x, w, b, None, 1e-5, False)
    count = x.numel() // C

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

    def autograd_only():
        y, _, _ = BatchNormTrain.apply(x, w, b, None, 1e-5, False)
        y.backward(dy)

    cases = [
        ("torch  module forward+backward", step(ref)),
        ("fastbn module forward+backward", step(ours)),
        ("torch  module forward", fwd(ref)),
        ("fastbn module forward", fwd(ours)),
        ("fastbn BatchNormTrain.apply + backward", autograd_only),
        ("op forward_train", lambda: ops.forward_train(x, w, b, None, 1e-5, False)),
        ("op update_running_stats", lambda: ops.update_running_stats(rm, rv, mean, var, 0.1, count)),
        ("op backward_train", lambda: ops.backward_train(dy, x, mean, invstd, w, b, None, False,
                                                          [True, True, True, False])),
        ("num_batches_tracked.add_(1)", lambda: ours.num_batches_tracked.add_(1)),
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
