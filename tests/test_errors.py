"""Bad input gets a clear error (PyTorch's wording where it has one), raised before any
state changes: running statistics and num_batches_tracked are untouched."""
import re

import pytest
import torch
from helpers import DEVICES, HAS_CUDA, make_pair, requires_cuda

import fastbn
import fastbn.functional as FF
from fastbn import ops


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, snap):
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def _expect(module, x, exc, pattern):
    snap = _snapshot(module)
    with pytest.raises(exc, match=pattern):
        module(x)
    _assert_unchanged(module, snap)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_rank(device):
    _expect(fastbn.BatchNorm1d(3, device=device), torch.randn(2, 3, 4, 4, device=device), ValueError,
            re.escape("expected 2D or 3D input (got 4D input)"))
    _expect(fastbn.BatchNorm2d(3, device=device), torch.randn(2, 3, 4, device=device), ValueError,
            re.escape("expected 4D input (got 3D input)"))
    _expect(fastbn.BatchNorm3d(3, device=device), torch.randn(2, 3, 4, 4, device=device), ValueError,
            re.escape("expected 5D input (got 4D input)"))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        FF.batch_norm(torch.randn(5, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ops.forward_train(torch.randn(5, device=device), None, None, None, None, None, None, None, 1e-5, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_channel_mismatch(device, training):
    x = torch.randn(4, 5, 3, 3, device=device)
    for kw, name in [(dict(), "running_mean"), (dict(track_running_stats=False), "weight"),
                     (dict(affine=False), "running_mean")]:
        m = fastbn.BatchNorm2d(4, device=device, **kw).train(training)
        if not training and not m.track_running_stats and not m.affine:
            continue
        _expect(m, x, RuntimeError, f"{name} should contain 5 elements not 4")


@pytest.mark.parametrize("device", DEVICES)
def test_one_value_per_channel(device):
    msg = "Expected more than 1 value per channel when training"
    _expect(fastbn.BatchNorm1d(4, device=device), torch.randn(1, 4, device=device), ValueError, msg)
    _expect(fastbn.BatchNorm2d(4, device=device), torch.randn(1, 4, 1, 1, device=device), ValueError, msg)
    _expect(fastbn.BatchNorm2d(4, device=device, track_running_stats=False).eval(),
            torch.randn(1, 4, 1, 1, device=device), ValueError, msg)
    with pytest.raises(ValueError, match=msg):
        ops.forward_train(torch.randn(1, 4, device=device), None, None, None, None, None, None, None, 1e-5, False)
    # Eval with running statistics accepts a single value.
    m = fastbn.BatchNorm1d(4, device=device).eval()
    torch.testing.assert_close(m(torch.ones(1, 4, device=device)), torch.nn.BatchNorm1d(4, device=device).eval()(
        torch.ones(1, 4, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_eps(device):
    for eps in (0.0, -1e-5):
        _expect(fastbn.BatchNorm2d(3, eps=eps, device=device), torch.randn(2, 3, 2, 2, device=device), ValueError,
                "eps must be positive")
        with pytest.raises(ValueError, match="eps must be positive"):
            ops.forward_train(torch.randn(2, 3, device=device), None, None, None, None, None, None, None, eps, False)
    m = fastbn.BatchNorm2d(3, eps=-1.0, device=device).eval()
    _expect(m, torch.randn(2, 3, 2, 2, device=device), ValueError, "eps must be non-negative")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_unsupported_dtypes(device, dtype):
    x = torch.ones(2, 3, 2, 2, device=device, dtype=dtype)
    m = fastbn.BatchNorm2d(3, device=device)
    _expect(m, x, NotImplementedError, '"batch_norm" not implemented for')


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_sizes_and_dtypes(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    good = torch.ones(3, device=device)
    for name, args in [
        ("weight", (torch.ones(4, device=device), None)),
        ("bias", (None, torch.ones(2, device=device))),
    ]:
        with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements"):
            ops.forward_train(x, *args, None, None, None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 4"):
        ops.forward_eval(x, good, torch.ones(4, device=device), None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="expected weight to have dtype Float"):
        ops.forward_train(x, good.double(), None, None, None, None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="expected running_mean to have dtype Half or Float"):
        ops.forward_eval(x.half(), good.double(), good, None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops.forward_train(x, None, None, torch.randn(4, 3, 2, 1, device=device), None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        ops.forward_train(x, None, None, x.double(), None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        ops.backward_train(torch.randn(4, 3, 2, device=device), x, good, good, None, None, None, False,
                           [True, False, False, False])


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_errors_change_nothing(device):
    """The training forward checks every argument before it writes anything: a rejected call
    leaves the running statistics and num_batches_tracked as they were."""
    x = torch.randn(4, 3, 2, 2, device=device)
    ones = torch.ones(3, device=device)
    rm, rv, nbt = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5, torch.tensor(5, device=device)
    cases = [
        (dict(running_var=torch.ones(4, device=device)), RuntimeError, "running_var should contain 3 elements not 4"),
        (dict(running_mean=torch.ones(3, device=device, dtype=torch.int64)), RuntimeError,
         "running_mean must be floating point"),
        (dict(num_batches_tracked=torch.tensor(5.0, device=device)), RuntimeError,
         "num_batches_tracked must be a one-element int64 tensor"),
        (dict(num_batches_tracked=None, momentum=None), ValueError, "needs num_batches_tracked"),
        (dict(running_var=None), ValueError, "must both be given or both be None"),
        (dict(weight=torch.ones(4, device=device)), RuntimeError, "weight should contain 3 elements not 4"),
        (dict(residual=torch.ones(4, 3, 2, device=device)), RuntimeError, "residual has shape"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
        (dict(input=torch.randn(1, 3, device=device)), ValueError, "Expected more than 1 value per channel"),
    ]
    for bad, exc, pattern in cases:
        args = dict(input=x, weight=ones, bias=None, residual=None, running_mean=rm, running_var=rv,
                    num_batches_tracked=nbt, momentum=0.1, eps=1e-5, relu=False)
        args.update(bad)
        before = [t.clone() for t in (rm, rv, nbt)]
        with pytest.raises(exc, match=pattern):
            ops.forward_train(**args)
        for t, b in zip((rm, rv, nbt), before):
            assert torch.equal(t, b), (bad, t, b)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 4"):
        FF.batch_norm(x, rm, torch.ones(4, device=device), training=True)
    # ...and a good call changes all three (the checks above can fail).
    before = [t.clone() for t in (rm, rv, nbt)]
    ops.forward_train(x, ones, None, None, rm, rv, nbt, None, 1e-5, False)
    assert int(nbt) == 6 and not torch.equal(rm, before[0]) and not torch.equal(rv, before[1])


@pytest.mark.parametrize("device", DEVICES)
def test_functional_eval_needs_running_stats(device):
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        FF.batch_norm(torch.randn(2, 3, device=device), None, None, training=False)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        FF.batch_norm(torch.randn(2, 3, device=device), None, None, training=True, activation="gelu")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for f in (FF.batch_norm, torch.nn.functional.batch_norm):  # momentum must be a number, as in torch
        with pytest.raises(TypeError, match="argument 'momentum' .* must be float, not NoneType"):
            f(torch.randn(2, 3, device=device), rm, rv, training=True, momentum=None)


@requires_cuda
def test_wrong_device():
    x = torch.randn(4, 3, 2, 2, device="cuda")
    m = fastbn.BatchNorm2d(3)  # parameters on the CPU
    _expect(m, x, RuntimeError, "Expected all tensors to be on the same device")
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        ops.forward_train(x.cpu(), torch.ones(3, device="cuda"), None, None, None, None, None, None, 1e-5, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0, 4), (0, 3, 2, 2, 2)])
def test_empty_batch_like_torch(device, shape):
    kind = {2: 1, 4: 2, 5: 3}[len(shape)]
    ref, ours = make_pair(kind, 3, device)
    xr = torch.randn(shape, device=device, requires_grad=True)
    xo = xr.detach().clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert yo.shape == yr.shape
    yr.sum().backward()
    yo.sum().backward()
    assert xo.grad.shape == xr.grad.shape
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    ref.eval(), ours.eval()
    assert ours(xo).shape == ref(xr).shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_propagate_like_torch(device, layout):
    x = torch.randn(4, 3, 3, 3, device=device)
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 1, 1] = float("inf")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    ref, ours = make_pair(2, 3, device)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert torch.equal(torch.isnan(yo), torch.isnan(yr))
    assert torch.equal(torch.isinf(yo), torch.isinf(yr))
    finite = torch.isfinite(yr)
    torch.testing.assert_close(yo[finite], yr[finite])
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert torch.equal(torch.isnan(a) | torch.isinf(a), torch.isnan(b) | torch.isinf(b)), name
    g = torch.randn_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert torch.equal(torch.isfinite(xo.grad), torch.isfinite(xr.grad))
