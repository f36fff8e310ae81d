"""gradcheck / gradgradcheck in float64 through fastbn.functional.batch_norm: input, weight
and bias, training and eval, both layouts."""
import pytest
import torch
from helpers import DEVICES

import fastbn.functional as FF


def _inputs(shape, device, layout="contiguous", affine=True):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 1.5 + 0.3
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    C = shape[1]
    w = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_() if affine else None
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    return x, w, b, rm, rv


CASES = [((4, 3, 3, 2), "contiguous"), ((4, 3, 3, 2), "channels_last"), ((6, 4), "contiguous"), ((3, 2, 5), "contiguous"),
         ((2, 2, 2, 3, 2), "contiguous")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_gradcheck(case, training, device):
    shape, layout = case
    x, w, b, rm, rv = _inputs(shape, device, layout)

    def f(x, w, b):
        return FF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_no_affine(training, device):
    x, _, _, rm, rv = _inputs((5, 3, 4), device, affine=False)

    def f(x):
        return FF.batch_norm(x, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-3)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_partial_requires_grad(device):
    """Only some inputs need gradients: the others get None, and what is computed is right."""
    x, w, b, rm, rv = _inputs((4, 3, 5), device)
    for needs in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        xs, ws, bs = [t.detach().clone().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        xr, wr, br = [t.detach().clone().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        y = FF.batch_norm(xs, None, None, ws, bs, True)
        yr = torch.nn.functional.batch_norm(xr, None, None, wr, br, True)
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        for ours, ref in zip((xs, ws, bs), (xr, wr, br)):
            if ref.requires_grad:
                torch.testing.assert_close(ours.grad, ref.grad)
            else:
                assert ours.grad is None
