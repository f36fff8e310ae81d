"""The ops themselves: opcheck (schema, fake/meta implementations, autograd registration),
torch.compile(fullgraph=True) against eager, and proof that no ATen batch-norm op runs."""
import pytest
import torch
from helpers import DEVICES, acc_dtype, make_input, make_pair, poisoned_outputs

import fastbn
from fastbn import ops


def _op_samples(device, layout="contiguous", dtype=torch.float32):
    x = make_input((4, 3, 5, 6), dtype, device, layout)
    C = 3
    acc = acc_dtype(dtype)
    w = torch.rand(C, device=device, dtype=acc) + 0.5
    b = torch.randn(C, device=device, dtype=acc)
    r = make_input((4, 3, 5, 6), dtype, device, layout)
    rm = torch.randn(C, device=device, dtype=acc)
    rv = torch.rand(C, device=device, dtype=acc) + 0.5
    dy = make_input((4, 3, 5, 6), dtype, device, layout)
    y, mean, invstd, var = ops.forward_train(x, w, b, None, 1e-5, False)
    sum_dy, sum_dy_xhat = ops.backward_reduce(dy, x, mean, invstd, w, b, r, True)
    counts = torch.tensor([7, 5], device=device)
    means = torch.randn(2, C, device=device, dtype=acc)
    vars_ = torch.rand(2, C, device=device, dtype=acc)
    return [
        (ops.forward_train, (x, w, b, None, 1e-5, False)),
        (ops.forward_train, (x, w, None, r, 1e-3, True)),
        (ops.forward_train, (x, None, None, None, 1e-5, False)),
        (ops.forward_eval, (x, rm, rv, w, b, None, 1e-5, False)),
        (ops.forward_eval, (x, rm, rv, None, b, r, 1e-5, True)),
        (ops.update_running_stats, (rm.clone(), rv.clone(), mean, var, 0.1, 120)),
        (ops.backward_train, (dy, x, mean, invstd, w, b, None, False, [True, True, True, False])),
        (ops.backward_train, (dy, x, mean, invstd, w, b, r, True, [True, False, True, True])),
        (ops.backward_train, (dy, x, mean, invstd, None, None, None, False, [True, False, False, False])),
        (ops.backward_eval, (dy, x, rm, rv, w, b, None, 1e-5, False, [True, True, True, False])),
        (ops.backward_eval, (dy, x, rm, rv, w, b, r, 1e-5, True, [False, True, False, True])),
        (ops.batch_stats, (x,)),
        (ops.merge_stats, (counts, means, vars_, 1e-5)),
        (ops.normalize, (x, mean, invstd, w, b, r, True)),
        (ops.backward_reduce, (dy, x, mean, invstd, w, b, r, True)),
        (ops.backward_elemt, (dy, x, mean, invstd, w, b, r, True, sum_dy, sum_dy_xhat, 120, [True, True])),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout):
    samples = _op_samples(device, layout)
    for op, args in samples:
        torch.library.opcheck(op, args)
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbn::")}
    assert len(registered) >= 10
    covered = {str(op).split(".")[-1] for op, _ in samples}
    assert registered <= covered, f"ops without an opcheck sample: {registered - covered}"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_reduced_precision(device):
    for op, args in _op_samples(device, dtype=torch.bfloat16)[:4]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph_matches_eager(device, layout):
    torch._dynamo.reset()
    _, eager = make_pair(2, 4, device)
    _, compiled_mod = make_pair(2, 4, device)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True)
    for step in range(3):
        x = make_input((3, 4, 5, 5), torch.float32, device, layout)
        xe = x.clone().requires_grad_()
        xc = x.clone().requires_grad_()
        ye = eager(xe)
        yc = compiled(xc)
        torch.testing.assert_close(yc, ye)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(compiled_mod.weight.grad, eager.weight.grad)
        torch.testing.assert_close(compiled_mod.bias.grad, eager.bias.grad)
        torch.testing.assert_close(compiled_mod.running_mean, eager.running_mean)
        torch.testing.assert_close(compiled_mod.running_var, eager.running_var)
        assert int(compiled_mod.num_batches_tracked) == int(eager.num_batches_tracked)
        eager.weight.grad = eager.bias.grad = None
        compiled_mod.weight.grad = compiled_mod.bias.grad = None
    eager.eval()
    compiled_mod.eval()
    x = make_input((3, 4, 5, 5), torch.float32, device, layout)
    torch.testing.assert_close(torch.compile(compiled_mod, fullgraph=True)(x), eager(x))


def test_export():
    mod = fastbn.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    ep = torch.export.export(mod, (x,))
    torch.testing.assert_close(ep.module()(x), mod(x))


BN_OPS = ("batch_norm", "native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_no_aten_batch_norm(device, training):
    """fastbn's forward and backward never call ATen's batch norm (profiler trace)."""
    from torch.profiler import ProfilerActivity, profile

    _, m = make_pair(2, 4, device)
    m.train(training)
    x = make_input((3, 4, 5, 5), torch.float32, device).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = m(x)
        y.backward(torch.randn_like(y))
    names = {e.name for e in prof.events()}
    assert any(n.startswith("fastbn::") for n in names), names
    offenders = {n for n in names if n.startswith("aten::") and any(k in n for k in BN_OPS)}
    assert not offenders, offenders
    # ...while the same trace of torch's module does show them (the check can fail).
    ref = torch.nn.BatchNorm2d(4, device=device).train(training)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ref(x).sum().backward()
    assert any(e.name.startswith("aten::") and "batch_norm" in e.name for e in prof.events())


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_makes_no_zero_gradients(device):
    """A training step's backward makes no zero tensors for the (non-differentiable) batch
    statistics outputs: each would be an extra allocation and kernel launch a step."""
    from torch.profiler import ProfilerActivity, profile

    from fastbn._autograd import BatchNormTrain

    _, m = make_pair(2, 4, device)
    x = make_input((3, 4, 5, 5), torch.float32, device).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(x).backward(torch.randn_like(x))
    zeros = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_")]
    assert not zeros, zeros
    # With gradient materialisation on (autograd's default), the same step makes them.
    old = BatchNormTrain.forward

    def materialising(ctx, *args):
        out = old(ctx, *args)
        ctx.set_materialize_grads(True)
        return out

    BatchNormTrain.forward = staticmethod(materialising)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m(x).backward(torch.randn_like(x))
    finally:
        BatchNormTrain.forward = staticmethod(old)
    assert any(e.name == "aten::zeros" for e in prof.events())


@pytest.mark.parametrize("device", DEVICES)
def test_ops_write_every_element(device):
    """Outputs poisoned with NaN before each op: any unwritten element would remain NaN."""
    with poisoned_outputs():
        for op, args in _op_samples(device, "contiguous") + _op_samples(device, "channels_last"):
            out = op(*args)
            outs = out if isinstance(out, tuple) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    assert not torch.isnan(t).any(), str(op)
