"""Correctness before timing: the module under test and torch eager on the same data, and which
PyTorch BatchNorm kernel eager runs.

Contracts:
- module_pair(case, mode, impl_factory, seed) returns (implementation, torch eager reference)
  holding the same random, non-default parameters and running statistics (via state_dict), in
  train mode unless mode is "eval". impl_factory(kind, num_features, **kwargs) builds the module
  under test; kwargs holds `device`. fastbn_factory is the default (fastbn.testing.FASTBN).
- step(module, mode, x, dy) is exactly one timed call.
- check_case(case, mode, impl_factory, seed) -> (passed, note). It compares the output, for
  "fwdbwd" the input/weight/bias gradients, and the running statistics and num_batches_tracked
  after the call, within fastbn.testing's tolerances for the input dtype (tol; reduction_tol
  over the m values of a channel for the weight/bias gradients; num_batches_tracked exactly).
  Where the implementation differs from torch eager, torch BatchNorm in float64 on the same data
  decides: matching it, or being no farther from it than eager is in every output, passes with
  a note; else it fails. A note is "" when
  everything matched eager; it names the first mismatch (or the exception raised) otherwise.
  Raises CaseSkipped when torch eager itself fails, torch.OutOfMemoryError when it does not fit.
- torch_kernel(case, mode, seed) returns one of TORCH_KERNELS.
Module classes are looked up at call time in this module's globals TORCH_BN and FASTBN
(fastbn.testing's tables; replacing TORCH_BN here changes the reference in check_case and
torch_kernel only).
"""
import math

import torch

from fastbn.testing import FASTBN, TORCH_BN, reduction_tol, tol

from .cases import random_tensor

# The values of the torch_kernel column, in display order.
TORCH_KERNELS = ("cudnn", "miopen", "native")


class CaseSkipped(Exception):
    """The case cannot be compared here: PyTorch itself fails on it."""


def fastbn_factory(kind, num_features, **kwargs):
    """Default implementation under test: fastbn.BatchNorm{kind}d(num_features, **kwargs)."""
    return FASTBN[kind](num_features, **kwargs)


def reference_module(case, seed):
    """torch eager BatchNorm with random, non-default parameters and running statistics."""
    c = case.num_features
    m = TORCH_BN[case.kind](c, device=case.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
        m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        m.num_batches_tracked.fill_(3)
    return m


def module_pair(case, mode, impl_factory, seed=0):
    """(module under test, torch eager reference) holding the same parameters and buffers,
    in train mode unless `mode` is "eval"."""
    ref = reference_module(case, seed)
    impl = impl_factory(case.kind, case.num_features, device=case.device)
    impl.load_state_dict(ref.state_dict())
    ref.train(mode != "eval")
    impl.train(mode != "eval")
    return impl, ref


def step(module, mode, x, dy):
    """One call of `module` in `mode`: exactly what gets timed."""
    if mode == "fwdbwd":
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    else:
        with torch.no_grad():
            module(x)


def _run_for_check(module, mode, x, dy):
    x = x.detach().clone().requires_grad_(mode == "fwdbwd")
    if mode == "fwdbwd":
        y = module(x)
        y.backward(dy)
    else:
        with torch.no_grad():
            y = module(x)
    out = {"output": y.detach()}
    if mode == "fwdbwd":
        out.update({"input grad": x.grad, "weight grad": module.weight.grad, "bias grad": module.bias.grad})
    out.update({"running_mean": module.running_mean, "running_var": module.running_var,
                "num_batches_tracked": module.num_batches_tracked})
    return out


def _mismatch(case, actual, expected):
    """None when `actual` matches `expected` (dicts from _run_for_check) within the case's
    tolerances, else a one-line description of the first mismatch."""
    elementwise = tol(case.torch_dtype)
    sums = reduction_tol(case.torch_dtype, case.reduction_size)
    for what, want in expected.items():
        got = actual[what]
        if got is None:
            return f"{what}: missing"
        if what == "num_batches_tracked":
            limits = {"rtol": 0, "atol": 0}
        elif what in ("weight grad", "bias grad"):
            limits = sums
        else:
            limits = elementwise
        want = want.to(got.dtype)  # a float64 reference, rounded like the result
        try:
            torch.testing.assert_close(got, want, **limits)
        except AssertionError:
            if got.shape != want.shape:
                return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            got, want = got.double(), want.double()
            bad = ~torch.isclose(got, want, **limits)
            diff = (got - want).abs().nan_to_num(nan=math.inf)
            return (f"{what}: {int(bad.sum())}/{bad.numel()} values differ, max abs diff {diff.max().item():.3g} "
                    f"(allowed: {limits['atol']:.3g} + {limits['rtol']:.3g} * |expected|)")
    return None


def check_case(case, mode, impl_factory=fastbn_factory, seed=0):
    """Compares the implementation built by `impl_factory` with torch eager on one input.

    Checks the output, and for "fwdbwd" the input, weight and bias gradients, plus the
    running statistics after the call. Where they differ beyond the tolerances, a float64
    run of torch BatchNorm on the same data decides: the implementation passes if it
    matches that (torch eager being the inaccurate one, as its CPU channels_last backward
    is in float32), or if no output of it is farther from that than torch eager's (both
    inaccurate, e.g. float32 sums over 10^5 values), else it fails.

    Returns (passed, note): note describes the mismatch (or the exception the implementation
    raised) in one line, "" when everything matched torch eager. Raises CaseSkipped when
    torch eager itself cannot run the case, torch.OutOfMemoryError when it does not fit.
    """
    impl, ref = module_pair(case, mode, impl_factory, seed)
    x = random_tensor(case, seed)
    dy = random_tensor(case, seed + 1) if mode == "fwdbwd" else None
    try:
        expected = _run_for_check(ref, mode, x, dy)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any PyTorch failure means the case cannot be compared
        raise CaseSkipped(f"torch eager failed: {type(e).__name__}: {first_line(e)}") from e
    try:
        actual = _run_for_check(impl, mode, x, dy)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - an implementation that raises has no correct result
        return False, f"raised {type(e).__name__}: {first_line(e)}"
    vs_eager = _mismatch(case, actual, expected)
    if vs_eager is None:
        return True, ""
    exact = TORCH_BN[case.kind](case.num_features, device=case.device, dtype=torch.float64)
    exact.load_state_dict(reference_module(case, seed).state_dict())
    exact.train(mode != "eval")
    truth = _run_for_check(exact, mode, x.double(), dy.double() if dy is not None else None)
    vs_exact = _mismatch(case, actual, truth)
    if vs_exact is None:
        return True, f"torch eager is off, fastbn matches the float64 reference; vs eager: {vs_eager}"
    worse = _less_accurate(case, actual, expected, truth)
    if worse is None:
        return True, f"no less accurate than torch eager, both off the float64 reference; vs float64: {vs_exact}"
    return False, f"{vs_exact}; {worse}"


def _less_accurate(case, actual, expected, truth):
    """None when every output of `actual` beyond the tolerances of `truth` (float64) is no
    farther from it than torch eager's (`expected`) is (largest absolute difference), else a
    description of the first that is farther."""
    for what, exact in truth.items():
        if what == "num_batches_tracked" or _mismatch(case, {what: actual[what]}, {what: exact}) is None:
            continue
        exact = exact.double()
        ours = (actual[what].double() - exact).abs().nan_to_num(nan=math.inf).max().item()
        theirs = (expected[what].double() - exact).abs().nan_to_num(nan=math.inf).max().item()
        if ours > theirs:
            return f"{what}: fastbn {ours:.3g} from float64, torch eager {theirs:.3g}"
    return None


def first_line(e):
    """The first line of an exception's message ("" if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def torch_kernel(case, mode, seed=0):
    """Which PyTorch BatchNorm implementation torch eager runs for (case, mode): "cudnn",
    "miopen" or "native", from the names of the ops torch.profiler records over one call of
    the reference module (forward, and for "fwdbwd" backward) on the case's input."""
    ref = reference_module(case, seed)
    ref.train(mode != "eval")
    x = random_tensor(case, seed, requires_grad=mode == "fwdbwd")
    dy = random_tensor(case, seed + 1) if mode == "fwdbwd" else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(ref, mode, x, dy)
    names = {e.name for e in prof.events()}
    for kernel in ("cudnn", "miopen"):
        if any(f"{kernel}_batch_norm" in name for name in names):
            return kernel
    return "native"
