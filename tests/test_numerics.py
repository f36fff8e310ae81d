"""Numerical quality: large offsets (no E[x^2] - E[x]^2), determinism (bitwise across runs
and CPU thread counts), and the baseline CPU kernels against the AVX2 ones."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICES, make_input

import fastbn
import fastbn.functional as FF


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [((64, 8, 12, 12), "contiguous"), ((64, 8, 12, 12), "channels_last"),
                                          ((5000, 16), "contiguous"), ((3, 2, 300, 300), "contiguous")])
def test_large_offset_float32(device, shape, layout):
    """x = 1e4 + N(0, 1) in float32 matches a float64 reference to 1e-3 relative."""
    x = (1e4 + torch.randn(shape, device=device, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    rm64, rv64 = rm.double(), rv.double()
    xo = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    y = FF.batch_norm(xo, rm, rv, training=True, momentum=1.0)
    y64 = torch.nn.functional.batch_norm(x64, rm64, rv64, training=True, momentum=1.0)
    assert _rel(y, y64) < 1e-3
    assert _rel(rv, rv64) < 1e-3
    assert _rel(rm, rm64) < 1e-6
    g = torch.randn_like(y64)
    y.backward(g.float())
    y64.backward(g)
    assert _rel(xo.grad, x64.grad) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(device, layout):
    m = fastbn.BatchNorm2d(16, device=device)
    x = make_input((8, 16, 20, 20), torch.float32, device, layout)
    g = torch.randn_like(x)
    results = []
    for _ in range(3):
        xi = x.clone().requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(xi)
        y.backward(g)
        results.append((y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape,layout", [((8, 3, 40, 40), "contiguous"), ((8, 64, 9, 9), "contiguous"),
                                          ((8, 6, 20, 20), "channels_last"), ((300, 24), "contiguous")])
def test_same_bits_any_thread_count(shape, layout):
    """Partial results are merged in a fixed order: 1 thread and all threads agree exactly."""
    x = make_input(shape, torch.float32, "cpu", layout)
    g = torch.randn_like(x)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])

    def run():
        xi = x.clone().requires_grad_()
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = FF.batch_norm(xi, None, None, wi, bi, training=True)
        y.backward(g)
        return y, xi.grad, wi.grad, bi.grad

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(n)
    many = run()
    for a, b_ in zip(one, many):
        assert torch.equal(a, b_)


_ISA_SCRIPT = r"""
import torch, fastbn, fastbn.functional as FF
from fastbn.testing import acc_dtype
torch.manual_seed(7)
out = {"isa": fastbn.cpu_isa()}
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for cl in (False, True):
        x = (torch.randn(4, 12, 9, 11, dtype=torch.float64) * 2 + 1).to(dt)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        r = torch.randn_like(x)
        y = FF.batch_norm(x, None, None, torch.rand(12, dtype=acc_dtype(dt)) + .5,
                          None, training=True, activation="relu", residual=r)
        y.backward(torch.randn_like(y))
        out[(str(dt), cl)] = (y.detach(), x.grad)
torch.save(out, __import__("sys").argv[1])
"""


def test_baseline_isa_matches_avx2(tmp_path):
    """The baseline (any x86-64) kernels give the same results as the AVX2 ones, to rounding."""
    results = {}
    for isa in ("base", "auto"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, FASTBN_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env, timeout=300)
        results[isa] = torch.load(path)
    assert results["base"]["isa"] == "base"
    for key, val in results["base"].items():
        if key == "isa":
            continue
        y, gx = val
        dt = y.dtype
        t = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dt]
        y2, gx2 = results["auto"][key]
        torch.testing.assert_close(y2, y, rtol=t, atol=t)
        torch.testing.assert_close(gx2, gx, rtol=t, atol=t * 10)
