"""Seeded fuzz: fastbn is never less accurate than PyTorch.

Each configuration draws a module kind, a shape (C = 1 and odd sizes included), a dtype, a
memory layout (contiguous, channels_last, a strided view, a storage offset), affine,
track_running_stats, momentum (None, 0, 1 or in between), eps, a data scale (1e-3 ... 1e3)
and offset (up to +-1e3), and a sequence of training and evaluation steps. torch.nn.BatchNorm
and fastbn run the same steps in that dtype, and ExactBatchNorm runs them in extended
precision on the same data. For every output, input/weight/bias gradient and running
statistic, fastbn's largest error against it must be at most RATIO (2) times PyTorch's own
plus a floor (ExactBatchNorm.step's `scale` times the dtype's precision): FLOOR_ULPS units at
the scale of the result's terms (|y|; |w * invstd * dy| for the input gradient; the root sum
of squares of dy * xhat and of dy for the weight and bias gradients, the size of a sum's
random rounding error; |running_mean| + the batch's standard deviation; |running_var|), plus for y and dx one unit of the mean times its coefficient, as
the mean is stored in the statistics dtype (float32 for float32 and half input) by PyTorch and
fastbn alike. Where cancellation leaves a result far smaller than its terms, two correct float
implementations differ at that scale.

`test_fuzz_quick` runs FAST configurations in the default suite; `test_fuzz_full` (slow) runs
FULL more with other seeds.
"""
import random

import numpy as np
import pytest
import torch

from fastbn.testing import FASTBN, TORCH_BN, acc_dtype
from helpers import DEVICES

FAST = 160
FULL = 1200
RATIO = 2.0
FLOOR_ULPS = 4.0
DTYPES = [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS_OF = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def draw(rng):
    """One configuration (a dict) from random.Random `rng`."""
    kind = rng.choice([1, 1, 2, 2, 2, 3])
    C = rng.choice([1, 2, 3, 4, 5, 7, 8, 16, 33])
    N = rng.choice([1, 2, 3, 4, 5, 8, 9, 16])
    if kind == 1:
        spatial = rng.choice([(), (), (rng.randint(1, 40),)])
    elif kind == 2:
        spatial = (rng.randint(1, 15), rng.randint(1, 15))
    else:
        spatial = (rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 7))
    m = N
    for s in spatial:
        m *= s
    if m == 1:  # training needs more than one value per channel
        N += 1
    shape = (N, C) + spatial
    layouts = ["contiguous", "strided", "offset"] + (["channels_last"] * 2 if len(shape) >= 4 else [])
    steps = [rng.choice(["train", "train", "eval"]) for _ in range(rng.randint(1, 3))]
    return dict(
        kind=kind, shape=shape, dtype=rng.choice(DTYPES), layout=rng.choice(layouts),
        affine=rng.random() < 0.75, track=rng.random() < 0.8,
        momentum=rng.choice([None, 0.0, 1.0, 0.1, rng.uniform(0.01, 0.9)]),
        eps=rng.choice([1e-5, 1e-5, 1e-3, 1e-1, 1e-8]),
        scale=10.0 ** rng.uniform(-3, 3), offset=rng.choice([0.0, rng.uniform(-1e3, 1e3), rng.uniform(-5, 5)]),
        steps=steps, seed=rng.randrange(2**31))


def _layout(x64, dtype, layout):
    """x64 (float64) converted to dtype, in the requested memory layout."""
    if layout == "channels_last":
        fmt = torch.channels_last if x64.dim() == 4 else torch.channels_last_3d
        return x64.to(dtype).contiguous(memory_format=fmt)
    if layout == "strided":
        big = torch.empty(x64.shape[:-1] + (2 * x64.shape[-1],), dtype=dtype, device=x64.device)
        big[..., ::2] = x64.to(dtype)
        return big[..., ::2]
    if layout == "offset":
        flat = torch.empty(x64.numel() + 1, dtype=dtype, device=x64.device)
        view = flat[1:].view(x64.shape)
        view.copy_(x64)
        return view
    return x64.to(dtype).contiguous()


def _modules(cfg, device):
    C, pdt = cfg["shape"][1], acc_dtype(cfg["dtype"])
    kw = dict(eps=cfg["eps"], momentum=cfg["momentum"], affine=cfg["affine"], track_running_stats=cfg["track"])
    ref = TORCH_BN[cfg["kind"]](C, device=device, dtype=pdt, **kw)
    gen = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        if cfg["affine"]:
            ref.weight.copy_(torch.rand(C, generator=gen) + 0.5)
            ref.bias.copy_(torch.randn(C, generator=gen))
        if cfg["track"]:
            ref.running_mean.copy_(torch.randn(C, generator=gen))
            ref.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
            ref.num_batches_tracked.fill_(int(torch.randint(0, 4, (1,), generator=gen)))
    ours = FASTBN[cfg["kind"]](C, device=device, dtype=pdt, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(module, x, dy, training):
    module.train(training)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True) if x.is_contiguous() or x.is_contiguous(
        memory_format=torch.channels_last) else x.detach().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    out = {"output": y.detach(), "input grad": x.grad}
    if module.weight is not None:
        out.update({"weight grad": module.weight.grad, "bias grad": module.bias.grad})
    if module.running_mean is not None:
        out.update({"running_mean": module.running_mean.detach().clone(),
                    "running_var": module.running_var.detach().clone()})
    return out


class ExactBatchNorm:
    """torch.nn.BatchNorm's semantics (batch statistics in training and when no running
    statistics are kept, PyTorch's running-statistics update incl. momentum=None) computed in
    numpy's extended precision (x86: 64-bit significand), the judge for float64 results. It
    follows the formulas of ../shared/DESIGN.md in their plainest form."""

    def __init__(self, module):
        ld = np.longdouble
        self.eps, self.momentum = ld(module.eps), module.momentum
        self.weight = module.weight.detach().cpu().numpy().astype(ld) if module.weight is not None else None
        self.bias = module.bias.detach().cpu().numpy().astype(ld) if module.bias is not None else None
        tracked = module.running_mean is not None
        self.rm = module.running_mean.cpu().numpy().astype(ld) if tracked else None
        self.rv = module.running_var.cpu().numpy().astype(ld) if tracked else None
        self.nbt = int(module.num_batches_tracked) if tracked else None
        self.spread = 0.0  # the last training batch's largest standard deviation

    def step(self, x, dy, training):
        ld = np.longdouble
        C = x.shape[1]
        xs = np.moveaxis(x.detach().cpu().double().numpy().astype(ld), 1, 0).reshape(C, -1)
        gs = np.moveaxis(dy.detach().cpu().double().numpy().astype(ld), 1, 0).reshape(C, -1)
        m = xs.shape[1]
        w = self.weight if self.weight is not None else np.ones(C, dtype=ld)
        b = self.bias if self.bias is not None else np.zeros(C, dtype=ld)
        batch = training or self.rm is None
        if batch:
            mean = xs.sum(1) / m
            var = ((xs - mean[:, None]) ** 2).sum(1) / m
        else:
            mean, var = self.rm, self.rv
        invstd = 1 / np.sqrt(var + self.eps)
        xhat = (xs - mean[:, None]) * invstd[:, None]
        y = xhat * w[:, None] + b[:, None]
        db = gs.sum(1)
        dw = (gs * xhat).sum(1)
        if batch:
            dx = (w * invstd / m)[:, None] * (m * gs - db[:, None] - xhat * dw[:, None])
        else:
            dx = gs * (w * invstd)[:, None]
        if training and self.rm is not None:
            self.nbt += 1
            f = ld(1) / self.nbt if self.momentum is None else ld(self.momentum)
            self.rm = (1 - f) * self.rm + f * mean
            self.rv = (1 - f) * self.rv + f * var * m / (m - 1)

        def back(v):  # (C, m) -> the input's shape, float64
            full = (x.shape[1], x.shape[0]) + tuple(x.shape[2:])
            return torch.from_numpy(np.moveaxis(v.reshape(full), 0, 1).astype(np.float64))

        out = {"output": back(y), "input grad": back(dx)}
        # The scale at which each result's rounding errors arise: its terms' magnitude, and
        # for y and dx also the mean's rounding to the statistics dtype (x - mean enters both,
        # with coefficients w * invstd and w * invstd^2 * sum(dy * xhat) / m).
        a = w * invstd
        bm = a * invstd * dw / m if batch else np.zeros(C, dtype=ld)
        scale = {"output": FLOOR_ULPS * np.abs(y).max() + np.abs(mean * a).max(),
                 "input grad": FLOOR_ULPS * np.abs(gs * a[:, None]).max() + np.abs(mean * bm).max()}
        if self.weight is not None:
            out.update({"weight grad": torch.from_numpy(dw.astype(np.float64)),
                        "bias grad": torch.from_numpy(db.astype(np.float64))})
            scale.update({"weight grad": FLOOR_ULPS * np.sqrt(((gs * xhat) ** 2).sum(1)).max(),
                          "bias grad": FLOOR_ULPS * np.sqrt((gs ** 2).sum(1)).max()})
        if self.rm is not None:
            out.update({"running_mean": torch.from_numpy(self.rm.astype(np.float64)),
                        "running_var": torch.from_numpy(self.rv.astype(np.float64))})
            if training:
                self.spread = np.sqrt(var).max()
            scale.update({"running_mean": FLOOR_ULPS * (np.abs(self.rm).max() + self.spread),
                          "running_var": FLOOR_ULPS * np.abs(self.rv).max()})
        return out, {k: float(v) if np.size(v) else 0.0 for k, v in scale.items()}


def check_config(cfg, device="cpu"):
    """Runs one configuration; returns a list of failure descriptions (empty: fastbn was at
    least as accurate as PyTorch, within RATIO and the floor, everywhere)."""
    dtype = cfg["dtype"]
    ref, ours = _modules(cfg, device)
    judge = ExactBatchNorm(ref)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    failures = []
    for i, step in enumerate(cfg["steps"]):
        x64 = (torch.randn(cfg["shape"], generator=gen, dtype=torch.float64) * cfg["scale"] + cfg["offset"]).to(device)
        dy64 = torch.randn(cfg["shape"], generator=gen, dtype=torch.float64).to(device)
        x, dy = _layout(x64, dtype, cfg["layout"]), _layout(dy64, dtype, cfg["layout"])
        training = step == "train"
        want, scale = judge.step(x, dy, training)
        # cuDNN's backward (9.19, an H100) reads a half-precision grad_output at a storage offset
        # of one element with 4-byte loads: a misaligned-address fault. PyTorch is given an
        # aligned copy; fastbn gets the view itself.
        theirs = _step(ref, x, dy.clone() if dy.is_cuda and cfg["layout"] == "offset" else dy, training)
        got = _step(ours, x, dy, training)
        for key, w in want.items():
            if not torch.isfinite(w).all():
                continue  # degenerate (e.g. overflow in this dtype): covered by tests/test_nonfinite.py
            g, t = got[key].double().cpu(), theirs[key].double().cpu()
            if g.shape != w.shape:
                failures.append(f"step {i} ({step}) {key}: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
                continue
            err_ours = (g - w).abs().max().item() if w.numel() else 0.0
            err_torch = (t - w).abs().max().item() if w.numel() else 0.0
            floor = EPS_OF[dtype] * scale[key] + 1e-300
            if not err_ours <= RATIO * err_torch + floor:  # NaN fails too
                failures.append(f"step {i} ({step}) {key}: fastbn {err_ours:.3g} from exact, torch {err_torch:.3g} "
                                f"(allowed {RATIO * err_torch + floor:.3g})")
    return failures


def _run(seeds, device):
    bad = []
    for s in seeds:
        cfg = draw(random.Random(s))
        failures = check_config(cfg, device)
        if failures:
            bad.append(f"seed {s}: {cfg}\n    " + "\n    ".join(failures))
    assert not bad, f"{len(bad)}/{len(seeds)} configurations less accurate than torch:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_quick(device):
    _run(range(FAST), device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_full(device):
    _run(range(10_000, 10_000 + FULL), device)


def test_fuzz_catches_an_inaccurate_batchnorm(monkeypatch):
    """The criterion can fail: a BatchNorm whose outputs are off by 1e-5 relative (float32
    rounding is 6e-8) is reported, and so is one whose running variance is."""
    import fastbn

    class Noisy(fastbn.BatchNorm2d):
        def forward(self, input):
            return super().forward(input) * (1 + 1e-5)

    class DriftingVar(fastbn.BatchNorm2d):
        def forward(self, input):
            out = super().forward(input)
            if self.training and self.running_var is not None:
                with torch.no_grad():
                    self.running_var.mul_(1 + 1e-5)
            return out

    for cls, key in ((Noisy, "output"), (DriftingVar, "running_var")):
        monkeypatch.setitem(FASTBN, 2, cls)
        cfg = dict(kind=2, shape=(4, 3, 5, 7), dtype=torch.float32, layout="contiguous", affine=True, track=True,
                   momentum=0.1, eps=1e-5, scale=2.0, offset=0.5, steps=["train", "eval"], seed=5)
        failures = check_config(cfg)
        assert any(key in f for f in failures), (cls.__name__, failures)
