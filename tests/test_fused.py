"""Fused BatchNorm + ReLU (+ residual add): functional API and BatchNormAct modules against
relu(torch_bn(x) + residual), both layouts, all dtypes, training and eval, gradcheck."""
import pytest
import torch
from helpers import DEVICES, make_input, param_dtype, poisoned_outputs, randomize_, reduction_tol, tol

import fastbn
import fastbn.functional as FF

ACT = {1: fastbn.BatchNormAct1d, 2: fastbn.BatchNormAct2d, 3: fastbn.BatchNormAct3d}
REF = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
CASES = [((6, 5), "contiguous", 1), ((4, 3, 7), "contiguous", 1), ((4, 6, 5, 5), "contiguous", 2),
         ((4, 6, 5, 5), "channels_last", 2), ((2, 16, 9, 9), "channels_last", 2), ((2, 3, 3, 4, 5), "channels_last", 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add+relu"])
def test_act_module_parity(case, dtype, with_residual, device):
    """Against relu(torch_bn(x) + residual). For half/bfloat16 the reference runs in float32
    on the same values (fastbn computes in float32 and rounds once at the end; a reference
    that rounds after each op would put some relu-mask decisions on the other side of 0)."""
    shape, layout, kind = case
    C = shape[1]
    ref_dtype = param_dtype(dtype)
    ref = randomize_(REF[kind](C, device=device, dtype=ref_dtype))
    ours = ACT[kind](C, device=device, dtype=ref_dtype)
    ours.load_state_dict(ref.state_dict())
    for mode in ["train", "train", "eval"]:
        ref.train(mode == "train")
        ours.train(mode == "train")
        x = make_input(shape, dtype, device, layout)
        r = make_input(shape, dtype, device, layout) if with_residual else None
        xr, xo = x.to(ref_dtype).clone().requires_grad_(), x.clone().requires_grad_()
        rr = r.to(ref_dtype).clone().requires_grad_() if r is not None else None
        ro = r.clone().requires_grad_() if r is not None else None
        for p in list(ref.parameters()) + list(ours.parameters()):
            p.grad = None
        yr = ref(xr)
        if rr is not None:
            yr = yr + rr
        yr = torch.relu(yr)
        with poisoned_outputs():
            yo = ours(xo, ro)
        assert yo.dtype == dtype
        torch.testing.assert_close(yo, yr.to(dtype), **tol(dtype))
        g = torch.randn_like(yo)
        yr.backward(g.to(ref_dtype))
        with poisoned_outputs():
            yo.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad.to(dtype), **tol(dtype))
        if rr is not None:
            torch.testing.assert_close(ro.grad, rr.grad.to(dtype), **tol(dtype))
        m = x.numel() // C
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **reduction_tol(ref.weight.dtype, m))
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **reduction_tol(ref.bias.dtype, m))
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol(ref.running_mean.dtype))
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol(ref.running_var.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_gradcheck(training, layout, device):
    """gradcheck in float64 on input, weight, bias and residual (values kept away from the
    relu kink so finite differences are valid)."""
    torch.manual_seed(3)
    x = make_input((3, 2, 3, 3), torch.float64, device, layout).requires_grad_()
    r = make_input((3, 2, 3, 3), torch.float64, device, layout).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=device).requires_grad_()
    rm = torch.randn(2, dtype=torch.float64, device=device)
    rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b, r):
        return FF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3, activation="relu", residual=r)

    pre = FF.batch_norm(x.detach(), rm.clone(), rv.clone(), w.detach(), b.detach(), training, 0.1, 1e-3,
                        residual=r.detach())
    with torch.no_grad():  # move pre-activations near zero away from the kink
        r.add_(torch.where(pre.abs() < 0.05, 0.2 * torch.sign(pre + 1e-9), torch.zeros_like(pre)))
    assert torch.autograd.gradcheck(f, (x, w, b, r))
    assert torch.autograd.gradgradcheck(f, (x, w, b, r))


@pytest.mark.parametrize("device", DEVICES)
def test_residual_without_relu(device):
    x = make_input((4, 3, 5, 5), torch.float32, device).requires_grad_()
    r = make_input((4, 3, 5, 5), torch.float32, device).requires_grad_()
    m = fastbn.BatchNormAct2d(3, activation=None, device=device)
    y = m(x, r)
    ref = torch.nn.BatchNorm2d(3, device=device)(x.detach()) + r.detach()
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(r.grad, g)


def test_backward_keeps_no_output():
    """The relu mask is recomputed: the autograd graph holds the input (and residual), not
    the output."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastbn.BatchNormAct2d(3)(x)
    assert not any(t.data_ptr() == y.data_ptr() for t in saved)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)


def test_act_module_plumbing():
    m = fastbn.BatchNormAct2d(4, momentum=None, activation="relu")
    ref = torch.nn.BatchNorm2d(4, momentum=None)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert repr(m).endswith("activation='relu')")
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(m, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fastbn.BatchNormAct2d(4, activation="gelu")
