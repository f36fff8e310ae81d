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
    nbt = torch.tensor(3, device=device)
    y, mean, invstd, var = ops.forward_train(x, w, b, None, None, None, None, None, 1e-5, False)
    sum_dy, sum_dy_xhat = ops.backward_reduce(dy, x, mean, invstd, w, b, r, True)
    counts = torch.tensor([7, 5], device=device)
    means = torch.randn(2, C, device=device, dtype=acc)
    vars_ = torch.rand(2, C, device=device, dtype=acc)
    count = torch.tensor(120, device=device)
    return [
        (ops.forward_train, (x, w, b, None, rm.clone(), rv.clone(), nbt.clone(), 0.1, 1e-5, False)),
        (ops.forward_train, (x, w, None, r, rm.clone(), rv.clone(), nbt.clone(), None, 1e-3, True)),
        (ops.forward_train, (x, None, None, None, rm.to(x.dtype), rv.to(x.dtype), None, 0.2, 1e-5, False)),
        (ops.forward_train, (x, None, None, None, None, None, None, None, 1e-5, False)),
        (ops.forward_eval, (x, rm, rv, w, b, None, 1e-5, False)),
        (ops.forward_eval, (x, rm, rv, None, b, r, 1e-5, True)),
        (ops.backward_train, (dy, x, mean, invstd, w, b, None, False, [True, True, True, False])),
        (ops.backward_train, (dy, x, mean, invstd, w, b, r, True, [True, False, True, True])),
        (ops.backward_train, (dy, x, mean, invstd, None, None, None, False, [True, False, False, False])),
        (ops.backward_eval, (dy, x, rm, rv, w, b, None, 1e-5, False, [True, True, True, False])),
        (ops.backward_eval, (dy, x, rm, rv, w, b, r, 1e-5, True, [False, True, False, True])),
        (ops.forward_composite, (x, w, b, r, None, None, True, 1e-5, True)),
        (ops.forward_composite, (x, None, b, None, rm, rv, False, 1e-5, False)),
        (ops.batch_stats, (x,)),
        (ops.merge_stats, (counts, means, vars_, None, None, None, None, 1e-5)),
        (ops.merge_stats, (counts, means, vars_, rm.clone(), rv.clone(), nbt.clone(), None, 1e-5)),
        (ops.normalize, (x, mean, invstd, w, b, r, True)),
        (ops.backward_reduce, (dy, x, mean, invstd, w, b, r, True)),
        (ops.backward_elemt, (dy, x, mean, invstd, w, b, r, True, sum_dy, sum_dy_xhat, count, [True, True])),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout):
    samples = _op_samples(device, layout)
    for op, args in samples:
        torch.library.opcheck(op, args)
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbn::")}
    assert len(registered) >= 9
    covered = {str(op).split(".")[-1] for op, _ in samples}
    assert registered <= covered, f"ops without an opcheck sample: {registered - covered}"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_reduced_precision(device):
    for op, args in _op_samples(device, dtype=torch.bfloat16)[:4]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,momentum", [("contiguous", 0.1), ("channels_last", 0.1), ("contiguous", None)])
def test_compile_fullgraph_matches_eager(device, layout, momentum):
    torch._dynamo.reset()
    _, eager = make_pair(2, 4, device, momentum=momentum)
    _, compiled_mod = make_pair(2, 4, device, momentum=momentum)
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


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_export(training, momentum):
    """torch.export of the module: one fastbn op per call in the graph, the running statistics
    and num_batches_tracked updated by the exported program as by the module."""
    mod = fastbn.BatchNorm2d(3, momentum=momentum).train(training)
    ref = fastbn.BatchNorm2d(3, momentum=momentum).train(training)
    x = torch.randn(2, 3, 4, 4)
    ep = torch.export.export(mod, (x,))
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert [str(t) for t in calls if "fastbn" in str(t)] == ["fastbn.forward_train.default" if training
                                                            else "fastbn.forward_eval.default"], calls
    exported = ep.module()
    for _ in range(2):
        torch.testing.assert_close(exported(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(exported, name), getattr(ref, name))


@pytest.mark.parametrize("bad", ["channels", "one value"])
def test_compile_rejects_bad_input_as_eager_does(bad):
    """The fake implementations check the arguments: torch.compile raises eager's message at
    trace time, and nothing is updated."""
    torch._dynamo.reset()
    x, pattern = {"channels": (torch.randn(3, 5, 4, 4), "running_mean should contain 5 elements not 4"),
                  "one value": (torch.randn(1, 4, 1, 1), "Expected more than 1 value per channel when training")}[bad]
    m = fastbn.BatchNorm2d(4)
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        m(x)
    from torch._dynamo.testing import CompileCounter

    backend = CompileCounter()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    with pytest.raises(Exception, match=pattern):
        compiled(x)
    assert backend.frame_count == 0, "the graph was compiled: the error came at run time, not trace time"
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(4))


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

    _, m = make_pair(2, 4, device)
    x = make_input((3, 4, 5, 5), torch.float32, device).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(x).backward(torch.randn_like(x))
    zeros = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_")]
    assert not zeros, zeros

    # The check can fail: a Function with an unused second output, gradients materialised
    # (autograd's default), makes them.
    class TwoOutputs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2, t.sum(0)

        @staticmethod
        def backward(ctx, g, g_sum):
            return g * 2 + g_sum

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        TwoOutputs.apply(x)[0].backward(torch.randn_like(x))
    assert any(e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_") for e in prof.events())


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


def test_mutated_arguments_record_their_update():
    """The ops that update running statistics bump their version counters (so autograd sees a
    saved tensor go stale), and refuse inference tensors outside inference mode before writing
    anything, as in-place ATen ops do."""
    x = torch.randn(4, 3, 2, 2)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    for call in (lambda: ops.forward_train(x, None, None, None, rm, rv, nbt, 0.1, 1e-5, False),
                 lambda: ops.merge_stats(torch.tensor([4, 5]), torch.randn(2, 3), torch.rand(2, 3), rm, rv, nbt, None,
                                         1e-5)):
        before = [t._version for t in (rm, rv, nbt)]
        call()
        assert all(t._version > v for t, v in zip((rm, rv, nbt), before))
    with torch.inference_mode():
        m, ref = fastbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (ref, m):
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            module(x)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(3))
    with torch.inference_mode():
        m(x)
    assert int(m.num_batches_tracked) == 1
