"""The CUDA kernel-path matrix: inputs that reach every CUDA kernel path, one function that
calls every fastbn op, and the comparisons. Used by the emulator tests (tests/test_cuda_emu.py)
and, on a GPU, by scripts/exercise_kernels.py.

`run_ops(ops, ...)` calls all ten ops the same way whether `ops` is the emulated CUDA backend
(the fastbn_cuda_emu module) or torch.ops.fastbn (CPU or CUDA tensors). Each op gets the same
inputs on both sides, including the CPU's saved statistics and sums where an op takes
statistics, so a difference points at the kernels of that op alone.
"""
import contextlib
import dataclasses

import torch
from helpers import poisoned_outputs, reduction_tol, tol

EPS = 1e-5
MOMENTUM = 0.1
# Lines for the end of the pytest run (printed by tests/conftest.py): coverage, sanitizer
# runs, seeded bugs caught.
REPORT = {}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    layout: str = "planar"  # "planar" (NCHW, NCDHW, NCL) or "channels_last" (rows of C: NHWC, NDHWC, NLC, (N, C))
    misalign: str = ""      # "x": input at a storage offset of one element; "dy_r": grad_out and residual

    @property
    def id(self):
        s = "x".join(map(str, self.shape)) + ("-cl" if self.layout == "channels_last" and len(self.shape) > 2 else "")
        return s + (f"-misaligned_{self.misalign}" if self.misalign else "")

    @property
    def count(self):
        n = 1
        for i, d in enumerate(self.shape):
            n *= d if i != 1 else 1
        return n


# Every (layout, access) kernel path, for every dtype: vector = 16-byte accesses (S or C a
# multiple of 8, so also for half) and the planar reductions' 8-byte vectors (S = 900: a
# multiple of 4, not 8; S = 30: of 2, not 4), scalar = S or C odd (planar: scalar reductions,
# the flat elementwise kernels where the element count allows 16-byte vectors),
# grouped = planes no vector divides but channels in groups whose planes do (7x7, 3x3, 3x5x7 with
# C a multiple of 8: the grouped planar reductions; float and double also take them on
# (5, 4, 7, 7)), misaligned = a pointer 16-byte misaligned (so the scalar kernels run although
# sizes allow vectors). Each path has a case whose reduction is split over several blocks
# (count >= 12800) and merged.
PATHS = {
    ("planar", "vector"): [Case((4, 3, 16, 16)), Case((8, 3, 48, 48)), Case((2, 5, 4, 6, 8)), Case((16, 3, 30, 30)),
                           Case((6, 3, 5, 6))],
    ("planar", "scalar"): [Case((5, 4, 7, 7)), Case((16, 2, 37, 37)), Case((6, 5, 33)), Case((64, 1, 9, 9))],
    ("planar", "grouped"): [Case((6, 8, 7, 7)), Case((300, 8, 7, 7)), Case((40, 16, 3, 3)), Case((4, 8, 3, 5, 7))],
    ("planar", "misaligned"): [Case((4, 3, 16, 16), misalign="x"), Case((3, 2, 8, 8), misalign="dy_r")],
    ("channels_last", "vector"): [Case((4, 16, 6, 6), "channels_last"), Case((32, 8, 24, 24), "channels_last"),
                                  Case((300, 32), "channels_last"), Case((2, 16, 3, 4, 5), "channels_last"),
                                  Case((7, 24, 9), "channels_last"), Case((8, 4096), "channels_last")],
    ("channels_last", "scalar"): [Case((32, 3, 20, 20), "channels_last"), Case((300, 37), "channels_last"),
                                  Case((64, 1), "channels_last"), Case((2, 5, 3, 4, 5), "channels_last"),
                                  Case((5, 3, 20), "channels_last")],
    ("channels_last", "misaligned"): [Case((300, 32), "channels_last", "x"),
                                      Case((4, 16, 6, 6), "channels_last", "dy_r")],
}
# Cases whose reductions run on several blocks per channel (for the SM-count sweep).
MULTI_SPLIT = [Case((8, 3, 48, 48)), Case((16, 2, 37, 37)), Case((32, 8, 24, 24), "channels_last"),
               Case((32, 3, 20, 20), "channels_last")]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _place(values, case, misaligned, device):
    """values (contiguous NC..., on the CPU) on `device` in the case's layout, optionally at a
    storage offset of one element (so the data pointer is not 16-byte aligned)."""
    channels_last = case.layout == "channels_last" and values.dim() > 2
    if channels_last:
        values = values.permute([0] + list(range(2, values.dim())) + [1])  # rows of C
    buf = torch.empty(values.numel() + int(misaligned), dtype=values.dtype, device=device)
    out = buf[int(misaligned):].view(values.shape)
    out.copy_(values)
    if channels_last:
        out = out.permute([0, values.dim() - 1] + list(range(1, values.dim() - 1)))
    return out


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    dy: torch.Tensor
    r: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    rm: torch.Tensor
    rv: torch.Tensor
    counts: torch.Tensor  # merge_stats: [3] per-rank counts
    means: torch.Tensor   # [3, C]
    vars: torch.Tensor    # [3, C]


def make_inputs(case, dtype, seed, device="cpu"):
    """Random inputs of `case` (the same values for the same seed on every device)."""
    g = torch.Generator().manual_seed(seed)
    C = case.shape[1]
    acc = acc_dtype(dtype)

    def rnd(scale, offset):
        return (torch.randn(case.shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)

    x = _place(rnd(2.0, 0.5), case, case.misalign == "x", device)
    dy = _place(rnd(1.0, 0.1), case, case.misalign == "dy_r", device)
    r = _place(rnd(1.0, 0.0), case, case.misalign == "dy_r", device)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(acc)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(acc)
    counts = torch.tensor([case.count, 5, 17])
    means = torch.randn(3, C, generator=g, dtype=torch.float64).to(acc)
    vars_ = (torch.rand(3, C, generator=g, dtype=torch.float64) + 0.1).to(acc)
    per_channel = [t.to(device) for t in (w, b, rm, rv, counts, means, vars_)]
    return Inputs(x, dy, r, *per_channel)


def variants(dtype):
    """(name, affine params, residual?, relu) combinations: plain affine, fused add+relu, relu
    without affine; for half/bfloat16 also parameters in the input's dtype with a residual."""
    out = [("affine", "acc", False, False), ("add_relu", "acc", True, True), ("relu_noaffine", None, False, True)]
    if dtype in (torch.float16, torch.bfloat16):
        out.append(("add_params_in_input_dtype", "input", True, False))
    return out


def reference_stats(t, case, variant):
    """fastbn's CPU statistics and backward sums: the inputs of the ops that take statistics."""
    w, b, r, relu = _args(t, variant)
    ops = torch.ops.fastbn
    _, mean, invstd, var = ops.forward_train(t.x, w, b, r, None, None, None, None, EPS, relu)
    s1, s2 = ops.backward_reduce(t.dy, t.x, mean, invstd, w, b, r, relu)
    return mean, invstd, var, s1, s2


def _args(t, variant):
    _, params, residual, relu = variant
    if params is None:
        w = b = None
    elif params == "input":
        w, b = t.w.to(t.x.dtype), t.b.to(t.x.dtype)
    else:
        w, b = t.w, t.b
    return w, b, (t.r if residual else None), relu


def run_ops(ops, t, case, variant, ref, check_faults=None, poison=True):
    """Calls every fastbn op through `ops`; returns {output name: tensor}. check_faults (if
    given) is called after each op with its name (the emulated side checks for faults).
    poison: new tensors (outputs, workspaces) start as NaN / 0xFF instead of uninitialised."""
    w, b, r, relu = _args(t, variant)
    mean, invstd, var, s1, s2 = ref
    count = case.count
    out = {}

    def record(name, values, names):
        for n, v in zip(names, values):
            out[f"{name}.{n}"] = v
        if check_faults:
            check_faults(name)

    with poisoned_outputs() if poison else contextlib.nullcontext():
        record("forward_train", ops.forward_train(t.x, w, b, r, None, None, None, None, EPS, relu),
               ["y", "mean", "invstd", "var"])
        # Running statistics in the parameters' dtype: the input's (copies updated, written back) or float.
        dt = w.dtype if w is not None else t.rm.dtype
        rm, rv, nbt = t.rm.to(dt, copy=True), t.rv.to(dt, copy=True), torch.tensor(3, device=t.x.device)
        ops.forward_train(t.x, w, b, r, rm, rv, nbt, MOMENTUM, EPS, relu)
        record("forward_train[running]", (rm.clone(), rv.clone(), nbt.clone()),
               ["running_mean", "running_var", "num_batches_tracked"])
        ops.forward_train(t.x, w, b, r, rm, rv, nbt, None, EPS, relu)  # cumulative: factor 1 / 5
        record("forward_train[cumulative]", (rm, rv, nbt), ["running_mean", "running_var", "num_batches_tracked"])
        record("forward_eval", (ops.forward_eval(t.x, t.rm, t.rv, w, b, r, EPS, relu),), ["y"])
        record("backward_train", ops.backward_train(t.dy, t.x, mean, invstd, w, b, r, relu, [True] * 4),
               ["dx", "dw", "db", "dr"])
        record("backward_train[sums only]",
               ops.backward_train(t.dy, t.x, mean, invstd, w, b, r, relu, [False, True, True, False]),
               ["dx", "dw", "db", "dr"])
        record("backward_eval", ops.backward_eval(t.dy, t.x, t.rm, t.rv, w, b, r, EPS, relu, [True] * 4),
               ["dx", "dw", "db", "dr"])
        record("backward_eval[dx only]",
               ops.backward_eval(t.dy, t.x, t.rm, t.rv, w, b, r, EPS, relu, [True, False, False, False]),
               ["dx", "dw", "db", "dr"])
        record("batch_stats", ops.batch_stats(t.x), ["mean", "var"])
        rm, rv = t.rm.clone(), t.rv.clone()
        record("merge_stats", ops.merge_stats(t.counts, t.means, t.vars, rm, rv, None, MOMENTUM, EPS),
               ["mean", "invstd", "var", "count"])
        record("merge_stats[running]", (rm, rv), ["running_mean", "running_var"])
        record("normalize", (ops.normalize(t.x, mean, invstd, w, b, r, relu),), ["y"])
        record("backward_reduce", ops.backward_reduce(t.dy, t.x, mean, invstd, w, b, r, relu),
               ["sum_dy", "sum_dy_xhat"])
        n = torch.tensor(count, device=t.x.device)
        record("backward_elemt", ops.backward_elemt(t.dy, t.x, mean, invstd, w, b, r, relu, s1, s2, n, [True, True]),
               ["dx", "dr"])
    return out


def tolerance(name, value, count):
    """Tolerances for one output: per-channel sums as sums over `count` values, everything else
    (elementwise outputs, per-channel statistics) as correctly rounded values of its dtype."""
    if not value.is_floating_point():
        return dict(rtol=0, atol=0)
    if name.split(".")[-1] in ("dw", "db", "sum_dy", "sum_dy_xhat"):
        return reduction_tol(value.dtype, count)
    return tol(value.dtype)


def compare(got, expected, count, what):
    """Every output of `got` (emulated CUDA) close to `expected` (CPU)."""
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        a = got[name]
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
        assert a.stride() == e.stride() or a.numel() <= 1, f"{what} {name}: layout {a.stride()} vs {e.stride()}"
        torch.testing.assert_close(a, e, **tolerance(name, e, count), msg=lambda m: f"{what} {name}: {m}")


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def assert_bitwise_equal(a, b, what):
    for name in a:
        assert torch.equal(bits(a[name]), bits(b[name])), f"{what}: {name} differs bitwise"
