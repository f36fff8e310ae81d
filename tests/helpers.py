"""Shared helpers for the tests: devices, tolerances, module pairs, random inputs."""
import contextlib
import inspect
import zlib

import pytest
import torch

from fastbn.testing import FASTBN, TORCH_BN, acc_dtype, kind_of, reduction_tol, tol  # noqa: F401

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")

# Every device-parametrised test has a CUDA variant that skips itself without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# The kind -> class maps, the accumulation-dtype rule and the tolerance table are fastbn's
# one copy, shared with the benchmark and the scripts.
FAST_BN = FASTBN
param_dtype = acc_dtype


def assert_sums_close(got, ref, exact_fn, m, what, extra_atol=0.0):
    """Per-channel sums over m values (weight/bias gradients; m=1 for running statistics):
    `got` against `ref` (another implementation's result) within reduction_tol. Where they
    differ beyond it, a float64 result (`exact_fn()`, called only then) decides: `got` passes
    when it is within reduction_tol (+ extra_atol, a number or per-channel tensor) of it, or
    no farther from it than `ref` is (never less accurate than the reference)."""
    t = reduction_tol(ref.dtype, m)
    try:
        torch.testing.assert_close(got, ref, **t, msg=lambda s: f"{what}: {s}")
    except AssertionError as mismatch:
        exact = exact_fn().detach().to(device=got.device, dtype=torch.float64)
        err = (got.double() - exact).abs()
        err_got = err.max().item()
        err_ref = (ref.double().to(got.device) - exact).abs().max().item()
        extra = torch.as_tensor(extra_atol, dtype=torch.float64, device=got.device)
        within = bool((err <= t["atol"] + extra + t["rtol"] * exact.abs()).all())
        if not (within or err_got <= err_ref):
            raise AssertionError(f"{what}: {err_got:.3g} from the float64 result, the reference {err_ref:.3g}; "
                                 f"{mismatch}") from None


TORCH_BN_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


@contextlib.contextmanager
def poisoned_outputs():
    """Fills every newly allocated (uninitialised) tensor with NaN, so elements a kernel
    forgot to write show up as NaN."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def randomize_(module, gen=None):
    """Fresh non-trivial parameters and buffers (never the default ones/zeros)."""
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5, generator=gen)
        if module.bias is not None:
            module.bias.normal_(0.0, 0.5, generator=gen)
        if module.running_mean is not None:
            module.running_mean.normal_(0.0, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
            module.num_batches_tracked.fill_(int(torch.randint(0, 5, (1,), generator=gen)))
    return module


def make_pair(kind, channels, device="cpu", param_dt=torch.float32, **kwargs):
    """(torch module, fastbn module) with identical random parameters and buffers."""
    ref = TORCH_BN[kind](channels, device=device, dtype=param_dt, **kwargs)
    randomize_(ref)
    ours = FAST_BN[kind](channels, device=device, dtype=param_dt, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_step_matches(ours, ref, x, **tolerance):
    """One forward and backward of `ours` and `ref` on copies of `x` (the same random output
    gradient): their outputs and input gradients agree within `tolerance`."""
    xo, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    torch.testing.assert_close(yo, yr, **tolerance)
    g = torch.randn_like(yr)
    yo.backward(g)
    yr.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, **tolerance)


def assert_states_equal(ours, ref, **tolerance):
    """The same state_dict keys, in order, with values within `tolerance`."""
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tolerance, msg=lambda s: f"{k}: {s}")


def make_input(shape, dtype, device="cpu", layout="contiguous", scale=2.0, offset=0.5):
    """Random input (never zeros) in the requested memory layout:
    'contiguous', 'channels_last' (4-D/5-D) or 'strided' (a non-contiguous view)."""
    if layout == "strided":
        # Every other element along the last dimension of a twice-as-long buffer.
        big = list(shape)
        big[-1] *= 2
        base = torch.randn(big, device=device, dtype=torch.float64) * scale + offset
        return base[..., ::2].to(dtype) if dtype == torch.float64 else base.to(dtype)[..., ::2]
    x = (torch.randn(shape, device=device, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def load_script(path, name):
    """Imports a script (examples/, benchmarks/) as a module from its file path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



NONFINITE = {"+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def with_value_at(shape, dtype, layout, device, where, value, channel=1):
    """Random input whose `channel` holds `value` at its first, middle or last position (in
    the order (n, *spatial)), 'contiguous' or 'channels_last'."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((tuple(shape), where)).encode()))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    xc = x.movedim(1, 0).reshape(shape[1], -1)  # a copy: (C, m)
    m = xc.shape[1]
    xc[channel, {"first": 0, "middle": m // 2, "last": m - 1}[where]] = value
    x = xc.reshape((shape[1], shape[0]) + tuple(shape[2:])).movedim(0, 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    else:
        x = x.contiguous()
    return x.to(device)


def assert_same_nonfinite(got, want, label):
    """Every tensor of dict `got` has the NaN positions, the inf positions and the inf signs of
    the same key's tensor in `want` (NaN and inf compared separately)."""
    for key, w in want.items():
        g = got[key]
        assert torch.equal(torch.isnan(g).cpu(), torch.isnan(w).cpu()), \
            f"{label}: {key} NaN pattern differs: got {g.flatten()[:8].tolist()}, expected {w.flatten()[:8].tolist()}"
        assert torch.equal(torch.isinf(g).cpu(), torch.isinf(w).cpu()), \
            f"{label}: {key} inf pattern differs: got {g.flatten()[:8].tolist()}, expected {w.flatten()[:8].tolist()}"
        assert torch.equal(torch.signbit(g[torch.isinf(g)]).cpu(), torch.signbit(w[torch.isinf(w)]).cpu()), \
            f"{label}: {key} inf signs differ"
