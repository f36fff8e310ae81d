"""fastbn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: outputs, input/weight/bias
gradients and every buffer after each of several training steps, then eval outputs and
gradients, over constructor arguments, ranks, layouts and dtypes."""
import copy
import functools
import itertools

import pytest
import torch
from helpers import (DEVICES, TORCH_BN_HAS_BIAS_ARG, assert_sums_close, kind_of, make_input, make_pair, param_dtype,
                     poisoned_outputs, tol)

SHAPES = {
    "1d-2D": (16, 5),
    "1d-3D": (6, 4, 9),
    "2d": (4, 3, 6, 7),
    "2d-wide": (2, 20, 5, 5),
    "3d": (2, 3, 3, 4, 5),
}
LAYOUTS = {
    "1d-2D": ["contiguous", "strided"],
    "1d-3D": ["contiguous", "strided"],
    "2d": ["contiguous", "channels_last", "strided"],
    "2d-wide": ["contiguous", "channels_last"],
    "3d": ["contiguous", "channels_last", "strided"],
}
CASES = [(s, l) for s in SHAPES for l in LAYOUTS[s]]

CONSTRUCTORS = [
    dict(),
    dict(affine=False),
    dict(bias=False),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
]


def _cid(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _assert_grads(ref, ours, x_ref, x_ours, dtype, exact_module):
    """exact_module(): the float64 copy of `ref` after the same step (weight/bias gradients
    decide where fastbn's and torch's differ, e.g. cuDNN's half-precision sums)."""
    t = tol(dtype)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **t)
    for name in ("weight", "bias"):
        pr, po = getattr(ref, name), getattr(ours, name)
        assert (pr is None) == (po is None)
        if pr is not None:
            m = x_ref.numel() // max(x_ref.shape[1], 1)
            assert_sums_close(po.grad, pr.grad, lambda name=name: getattr(exact_module(), name).grad, m,
                              f"{name}.grad")


def _assert_buffers(ref, ours, exact_module):
    for name in ("running_mean", "running_var"):
        br, bo = getattr(ref, name), getattr(ours, name)
        assert (br is None) == (bo is None)
        if br is not None:
            assert_sums_close(bo, br, lambda name=name: getattr(exact_module(), name), 1, name)
    if ref.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def run_steps(ref, ours, shape, dtype, device, layout, steps=3):
    """Several training steps then eval, comparing everything at each step. Where fastbn and
    torch differ, a float64 twin that has run every step since the start decides (its
    running statistics carry no rounding from earlier steps, so neither side's drift is
    charged to the other)."""
    t = tol(dtype)
    ref64 = copy.deepcopy(ref).double()
    for mode in ["train"] * steps + ["eval"]:
        for m in (ref, ours, ref64):
            m.train(mode == "train")
        x = make_input(shape, dtype, device, layout)
        x_ref = x.detach().clone().requires_grad_()
        x_ours = x.detach().clone().requires_grad_()
        if layout == "strided":  # keep the view non-contiguous for fastbn
            x_ours = x.detach().requires_grad_()
        for p in list(ref.parameters()) + list(ours.parameters()) + list(ref64.parameters()):
            p.grad = None
        y64 = ref64(x.detach().double().requires_grad_())  # every step: the twin's buffers advance

        @functools.cache
        def exact_module():
            y64.backward(g.double())
            return ref64

        y_ref = ref(x_ref)
        with poisoned_outputs():
            y_ours = ours(x_ours)
        assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
        torch.testing.assert_close(y_ours, y_ref, **t)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        with poisoned_outputs():
            y_ours.backward(g)
        _assert_grads(ref, ours, x_ref, x_ours, dtype, exact_module)
        _assert_buffers(ref, ours, exact_module)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", CONSTRUCTORS, ids=_cid)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_parity(case, kw, dtype, device):
    if "bias" in kw and not TORCH_BN_HAS_BIAS_ARG:
        pytest.skip(f"torch {torch.__version__}'s BatchNorm has no bias argument")
    shape_name, layout = case
    shape = SHAPES[shape_name]
    ref, ours = make_pair(kind_of(len(shape)), shape[1], device, param_dtype(dtype), **kw)
    run_steps(ref, ours, shape, dtype, device, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [("2d", "contiguous"), ("2d", "channels_last"), ("1d-2D", "contiguous"),
                                  ("3d", "channels_last"), ("1d-3D", "strided")], ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("kw", [dict(), dict(affine=False, momentum=None)], ids=_cid)
def test_reduced_precision_parity(case, dtype, kw, device):
    """Half/bfloat16 input with float32 parameters and statistics, as under autocast."""
    shape_name, layout = case
    shape = SHAPES[shape_name]
    ref, ours = make_pair(kind_of(len(shape)), shape[1], device, torch.float32, **kw)
    run_steps(ref, ours, shape, dtype, device, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_reduced_precision_module(dtype, device):
    """module.to(half): parameters and buffers in the input's dtype too."""
    ref, ours = make_pair(2, 6, device, torch.float32)
    ref.to(dtype)
    ours.to(dtype)
    run_steps(ref, ours, (4, 6, 5, 5), dtype, device, "contiguous", steps=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape",
    [(7, 3, 2048 + 37), (3, 2, 70, 70), (64, 1000), (5, 17, 3, 3), (2, 9, 11, 13), (1, 4, 3, 3), (300, 3),
     (40, 1040), (3, 600, 3, 3)],
    ids=str,
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_odd_sizes(shape, layout, device):
    """Sizes that exercise vector tails, split planes, channel counts that do not divide
    the vector width, and channels-last strips (few rows of many channels; the last strip
    narrower)."""
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4-D input")
    ref, ours = make_pair(kind_of(len(shape)), shape[1], device, torch.float32)
    run_steps(ref, ours, shape, torch.float32, device, layout, steps=2)


@pytest.mark.parametrize("device", DEVICES)
def test_many_channels_split_path(device):
    """C smaller than the thread count and C large: both CPU threading paths agree with torch."""
    for shape in [(9, 1, 40, 40), (4, 3, 33, 33), (2, 130, 4, 4)]:
        ref, ours = make_pair(2, shape[1], device, torch.float32)
        run_steps(ref, ours, shape, torch.float32, device, "contiguous", steps=1)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device):
    """fastbn.functional.batch_norm with F.batch_norm's exact signature and semantics."""
    import fastbn.functional as FF
    import torch.nn.functional as F

    x = make_input((5, 4, 3, 3), torch.float32, device)
    for training, momentum in itertools.product([True, False], [0.1, 0.7]):
        rm_r, rv_r = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
        rm_o, rv_o = rm_r.clone(), rv_r.clone()
        w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
        y_ref = F.batch_norm(x, rm_r, rv_r, w, b, training, momentum, 1e-4)
        y_ours = FF.batch_norm(x, rm_o, rv_o, w, b, training, momentum, 1e-4)
        torch.testing.assert_close(y_ours, y_ref)
        torch.testing.assert_close(rm_o, rm_r)
        torch.testing.assert_close(rv_o, rv_r)
    # Training without running statistics, and positional/keyword forms.
    y_ref = F.batch_norm(x, None, None, training=True)
    y_ours = FF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y_ours, y_ref)
    import inspect

    sig_ref = inspect.signature(F.batch_norm)
    sig_ours = inspect.signature(FF.batch_norm)
    assert list(sig_ours.parameters)[: len(sig_ref.parameters)] == list(sig_ref.parameters)
    for name, p in sig_ref.parameters.items():
        assert sig_ours.parameters[name].default == p.default


@pytest.mark.parametrize("device", DEVICES)
def test_output_layout_follows_input(device):
    x = make_input((2, 3, 4, 5), torch.float32, device, "channels_last")
    y = __import__("fastbn").BatchNorm2d(3, device=device)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x = make_input((2, 3, 4, 5, 2), torch.float32, device, "channels_last")
    y = __import__("fastbn").BatchNorm3d(3, device=device)(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
