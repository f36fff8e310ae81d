"""CUDA-only checks (each skips itself without a GPU): CUDA against fastbn's CPU kernels and
torch for every kernel path (planar/channels-last, vectorised/scalar, one or many splits,
relu/residual), bitwise determinism, > 2^31 elements, non-default streams, CUDA-graph
capture of a training step. The device-parametrised suites (parity, gradcheck, ops, errors,
numerics) also run their CUDA variants."""
import functools

import pytest
import torch
from helpers import HAS_CUDA, acc_dtype, assert_sums_close, make_input, make_pair, poisoned_outputs, tol

import fastbn
import fastbn.functional as FF

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")

# (shape, layout): planar with S % vec == 0 and != 0, tiny and huge C, channels-last with
# C % vec == 0 and != 0, many splits (small C, large N*S), BatchNorm1d.
PATH_CASES = [
    ((8, 16, 32, 32), "contiguous"),
    ((8, 16, 7, 7), "contiguous"),
    ((64, 3, 64, 64), "contiguous"),
    ((2, 2048, 7, 7), "contiguous"),
    ((8, 16, 32, 32), "channels_last"),
    ((8, 6, 15, 15), "channels_last"),
    ((32, 4, 96, 96), "channels_last"),
    ((4096, 512), "contiguous"),
    ((300, 37), "contiguous"),
    ((4, 8, 5, 6, 7), "channels_last"),
]


def _run(x, w, b, r, relu, training, rm=None, rv=None, grad_dtype=None):
    """(y, dx, dw, db, dr) of one call; the output gradient is rounded to grad_dtype (default
    the output's dtype) first, so a float64 run can use a half-precision run's gradient."""
    x = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    br = b.detach().clone().requires_grad_()
    rr = r.detach().clone().requires_grad_() if r is not None else None
    with poisoned_outputs():
        y = FF.batch_norm(x, rm, rv, wr, br, training, 0.1, 1e-5, activation="relu" if relu else None, residual=rr)
        # Built in float32 and rounded once: an arange in float16 overflows to inf past 65504.
        g = (0.5 + torch.arange(y.numel(), device=y.device, dtype=torch.float32).remainder(7) * 0.1).reshape(
            y.shape).to(grad_dtype or y.dtype).to(y.dtype)
        y.backward(g)
    return y.detach(), x.grad, wr.grad, br.grad, None if rr is None else rr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu+residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_cpu(case, dtype, fused, training):
    """The CUDA kernels compute what the (separately verified) CPU kernels compute."""
    shape, layout = case
    C = shape[1]
    acc = acc_dtype(dtype)
    x = make_input(shape, dtype, "cpu", layout)
    r = make_input(shape, dtype, "cpu", layout) if fused else None
    w, b = torch.rand(C, dtype=acc) + 0.5, torch.randn(C, dtype=acc)
    rm, rv = torch.randn(C, dtype=acc), torch.rand(C, dtype=acc) + 0.5
    cpu = _run(x, w, b, r, fused, training, rm.clone(), rv.clone())
    rm_c, rv_c = rm.cuda(), rv.cuda()
    gpu = _run(x.cuda(), w.cuda(), b.cuda(), r.cuda() if fused else None, fused, training, rm_c, rv_c)
    t = tol(dtype)
    m = x.numel() // C
    @functools.cache
    def exact():  # fastbn's CPU kernels in float64, run only if a sum differs
        return _run(x.double(), w.double(), b.double(), r.double() if fused else None, fused, training,
                    rm.double(), rv.double(), grad_dtype=dtype)

    # dw = invstd * sum(dy * (x - mean)) with the batch mean rounded to float32: half an ulp of
    # it, times |sum(dy)| * invstd, is beyond any float32 kernel's reach.
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    mean_ulp = torch.finfo(acc).eps * xd.mean(dims).abs()
    invstd = (xd.var(dims, unbiased=False) + 1e-5).rsqrt() if training else (rv.double() + 1e-5).rsqrt()
    for i, (name, a, e) in enumerate(zip(("y", "dx", "dw", "db", "dr"), gpu, cpu)):
        if e is None:
            continue
        if name in ("dw", "db"):
            extra = mean_ulp * cpu[3].double().abs() * invstd if name == "dw" and training else 0.0
            assert_sums_close(a.cpu(), e, lambda i=i: exact()[i], m, name, extra)
        else:
            torch.testing.assert_close(a.cpu(), e, **t, msg=lambda s: f"{name}: {s}")
    if training:
        rm_cpu, rv_cpu = rm.clone(), rv.clone()
        FF.batch_norm(x, rm_cpu, rv_cpu, training=True)
        FF.batch_norm(x.cuda(), rm_c2 := rm.cuda(), rv_c2 := rv.cuda(), training=True)
        torch.testing.assert_close(rm_c2.cpu(), rm_cpu, **tol(acc))
        torch.testing.assert_close(rv_c2.cpu(), rv_cpu, **tol(acc))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitwise_identical_10_runs(layout, dtype):
    m = fastbn.BatchNorm2d(32, device="cuda")
    x = make_input((16, 32, 28, 28), dtype, "cuda", layout)
    g = torch.randn_like(x)
    ref = None
    for _ in range(10):
        xi = x.clone().requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(xi)
        y.backward(g)
        out = (y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone())
        if ref is None:
            ref = out
        for a, b in zip(out, ref):
            assert torch.equal(a, b)


def test_non_default_stream():
    _, m = make_pair(2, 8, "cuda")
    x = make_input((4, 8, 16, 16), torch.float32, "cuda")
    expected = m(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = m(x)
        got2 = FF.batch_norm(x, None, None, m.weight, m.bias, True)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    torch.testing.assert_close(got2, FF.batch_norm(x, None, None, m.weight, m.bias, True))
    # Running stats moved twice since `expected`; outputs use batch statistics, so equal.
    torch.testing.assert_close(got, expected)


def test_cuda_graph_capture_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), fastbn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3, padding=1), fastbn.BatchNorm2d(4)).cuda()
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), fastbn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1), fastbn.BatchNorm2d(4)).cuda()
    twin.load_state_dict(model.state_dict())
    static_x = torch.randn(8, 3, 16, 16, device="cuda")
    # Warm up on a side stream, as CUDA-graph capture requires.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(s)
    twin.load_state_dict(model.state_dict())
    for p in model.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().mean()
        static_loss.backward()
    for step in range(3):
        x = torch.randn(8, 3, 16, 16, device="cuda")
        static_x.copy_(x)
        graph.replay()
        for p in twin.parameters():
            p.grad = None
        loss = twin(x).square().mean()
        loss.backward()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, loss)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda s: f"{n}: {s}")
    # The replays updated the running statistics like the eager steps did (capture + 3 replays
    # on the graph side, 3 eager steps on the twin after syncing its state at capture time).
    assert int(model[1].num_batches_tracked) >= 3


@pytest.mark.slow
def test_more_than_2_31_elements_fp16():
    """64-bit indexing: a half tensor with more than 2^31 elements, planar layout."""
    N, C, S = 33, 2, 1 << 25  # 2.2e9 elements, 4.4 GB per tensor
    need = 5 * N * C * S * 2
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.randn(N, C, S, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    x.requires_grad_()
    y = FF.batch_norm(x, None, None, training=True)
    # Statistics of each channel in float64 from slices (no single kernel indexes > 2^31 here).
    xs = x.detach()
    for c in range(C):
        xc = xs[:, c].double()
        mean = xc.mean()
        var = xc.var(unbiased=False)
        tail = xs[-1, c, -1000:].double()
        expect = ((tail - mean) / torch.sqrt(var + 1e-5)).half()
        torch.testing.assert_close(y[-1, c, -1000:], expect, **tol(torch.float16))
        del xc
    g = torch.ones_like(y)
    y.backward(g)
    # With dy == 1 everywhere, sum dy_eff * xhat == 0 and dx == 0 up to rounding.
    assert x.grad[-1, -1, -1000:].abs().max().item() < 1e-2
