"""torch.func transforms (grad, vjp, jacrev, jacfwd, jvp, hessian, vmap, model ensembling) and
forward-mode AD on fastbn's layers, each compared with torch.nn.BatchNorm under the same
transform (fastbn/_autograd.py, fastbn/_vmap.py)."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import DEVICES, assert_states_equal, make_input, make_pair, randomize_
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import fastbn

F64 = dict(rtol=1e-9, atol=1e-10)


def _pair(device, train, **kwargs):
    ref, ours = make_pair(2, 3, device, torch.float64, **kwargs)
    return ref.train(train), ours.train(train)


def _x(device, shape=(4, 3, 3, 2)):
    return make_input(shape, torch.float64, device)


def _assert_state_equal(ours, ref):
    assert_states_equal(ours, ref, **F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train,stats", [(True, True), (True, False), (False, True)])
def test_grad_of_params(device, train, stats):
    """grad over the parameters with the buffers passed in (PyTorch's functional training
    step): the same gradients, and the same running statistics afterwards."""
    ref, ours = _pair(device, train, track_running_stats=stats)
    x = _x(device)
    out = {}
    for name, m in (("ref", ref), ("ours", ours)):
        params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
        out[name] = grad(lambda p, b: functional_call(m, (p, b), (x,)).pow(3).sum())(params, buffers)
    for k in out["ref"]:
        torch.testing.assert_close(out["ours"][k], out["ref"][k], **F64)
    _assert_state_equal(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_jacrev_jacfwd_jvp_of_input(device, train):
    ref, ours = _pair(device, train, track_running_stats=not train)
    x, t = _x(device), _x(device)
    torch.testing.assert_close(jacrev(ours)(x), jacrev(ref)(x), **F64)
    torch.testing.assert_close(jacfwd(ours)(x), jacfwd(ref)(x), **F64)
    y, ty = jvp(ours, (x,), (t,))
    y_ref, ty_ref = jvp(ref, (x,), (t,))
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(ty, ty_ref, **F64)
    g = torch.randn_like(y)
    torch.testing.assert_close(vjp(ours, x)[1](g)[0], vjp(ref, x)[1](g)[0], **F64)


@pytest.mark.parametrize("train", [True, False])
def test_hessian(train):
    """Second order through the transforms (jacfwd over jacrev, jacrev over jacrev)."""
    ref, ours = _pair("cpu", train, track_running_stats=not train)
    x = _x("cpu", (3, 3, 2, 1))
    for m in (ref, ours):
        m.h = hessian(lambda x: m(x).pow(3).sum())(x)
        m.hr = jacrev(jacrev(lambda x: m(x).pow(3).sum()))(x)
    torch.testing.assert_close(ours.h, ref.h, **F64)
    torch.testing.assert_close(ours.hr, ref.hr, **F64)
    assert ours.h.abs().sum() > 0


def test_jacrev_updates_running_stats_once():
    """Training with running statistics under jacrev: PyTorch refuses (its module mutates a
    captured buffer); fastbn's Jacobian is the batch-statistics one and its running
    statistics take one update, as one eager forward gives."""
    ref, ours = _pair("cpu", True)
    eager = copy.deepcopy(ref)
    x = _x("cpu")
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        jacrev(ref)(x)
    nostats = copy.deepcopy(ref)
    nostats.track_running_stats = False
    torch.testing.assert_close(jacrev(ours)(x), jacrev(nostats)(x), **F64)
    eager(x)
    _assert_state_equal(ours, eager)


@pytest.mark.parametrize("train", [True, False])
def test_forward_ad_dual_tensors(train):
    ref, ours = _pair("cpu", train, track_running_stats=not train)
    x, t = _x("cpu"), _x("cpu")
    tangents = []
    for m in (ref, ours):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
            tangents.append((out.primal, out.tangent))
    torch.testing.assert_close(tangents[1][0], tangents[0][0], **F64)
    torch.testing.assert_close(tangents[1][1], tangents[0][1], **F64)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
def test_backward_of_graph_recorded_under_dual_level(train, activation):
    """A graph recorded while a forward-AD level is open, differentiated by a plain backward
    (fastbn's backward op, no graph of the backward): the gradients of relu(bn(x) + r) or
    bn(x) + r equal torch's."""
    ref, _ = _pair("cpu", train, track_running_stats=not train)
    ours = fastbn.BatchNormAct2d(3, dtype=torch.float64, activation=activation,
                                 track_running_stats=not train).train(train)
    ours.load_state_dict(ref.state_dict())
    x, r, g = _x("cpu"), _x("cpu"), _x("cpu")
    grads = []
    for fn in (lambda x, r: F.relu(ref(x) + r) if activation else ref(x) + r, ours):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        with fwAD.dual_level():
            fn(fwAD.make_dual(xs, torch.ones_like(x)), rs).backward(g)
        grads.append([xs.grad, rs.grad, ref.weight.grad if fn is not ours else ours.weight.grad])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, True)])
def test_functional_gradcheck_forward_and_double(relu, residual):
    """fastbn.functional.batch_norm under gradcheck's forward-mode and double-backward checks
    (the Python autograd Function and its composite derivative)."""
    x = _x("cpu", (5, 3, 2, 2)).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = _x("cpu", (5, 3, 2, 2)).requires_grad_() if residual else None
    act = "relu" if relu else None
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    inputs = (x, w, b) + ((r,) if residual else ())
    for training in (True, False):
        def fn(x, w, b, r=None):
            return fastbn.functional.batch_norm(x, rm, rv, w, b, training, 0.0, 1e-5, activation=act, residual=r)
        assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=True)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_vmap_over_batches(device, train):
    """vmap over a stack of batches: one fastbn call (no slow per-sample fallback), the same
    results as torch's."""
    ref, ours = _pair(device, train, track_running_stats=not train)
    xs = make_input((5, 4, 3, 3, 2), torch.float64, device)
    with torch.profiler.profile() as prof:
        got = vmap(ours)(xs)
    op = "fastbn::forward_train" if train else "fastbn::forward_eval"
    calls = sum(e.count for e in prof.key_averages() if e.key == op)
    assert calls == 2, f"{op} called {calls} times: the vmapped call and the batching rule's, not one per sample"
    torch.testing.assert_close(got, vmap(ref)(xs), **F64)
    torch.testing.assert_close(got[2], ours(xs[2]), **F64)


def test_vmap_refuses_shared_running_stats():
    ref, ours = _pair("cpu", True)
    xs = make_input((5, 4, 3, 3, 2), torch.float64)
    with pytest.raises(RuntimeError) as want:
        vmap(ref)(xs)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError) as got:
        vmap(ours)(xs)
    assert str(got.value).split("\n")[0] == str(want.value).split("\n")[0]
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def _ensemble(modules):
    params, buffers = stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")
    return params, buffers, lambda p, b, x: functional_call(base, (p, b), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train,momentum,shared_x", [(True, 0.1, False), (True, 0.1, True), (False, 0.1, False),
                                                     (True, None, False)])
def test_model_ensemble(device, train, momentum, shared_x):
    """torch.func.stack_module_state + vmap(functional_call): outputs and each model's updated
    running statistics equal running every model on its own (PyTorch's ensemble where it
    allows momentum; with momentum=None PyTorch reads a batched buffer's value and refuses)."""
    pairs = [_pair(device, train, momentum=momentum) for _ in range(3)]
    x = make_input((4, 3, 3, 2) if shared_x else (3, 4, 3, 3, 2), torch.float64, device)
    ours = [o for _, o in pairs]
    params, buffers, call = _ensemble(ours)
    got = vmap(call, in_dims=(0, 0, None if shared_x else 0))(params, buffers, x)
    for i, (ref, _) in enumerate(pairs):
        torch.testing.assert_close(got[i], ref(x if shared_x else x[i]), **F64)
        for name, value in ref.named_buffers():
            torch.testing.assert_close(buffers[name][i], value, **F64, msg=lambda s: f"model {i} {name}: {s}")
    ref_params, ref_buffers, ref_call = _ensemble([copy.deepcopy(r) for r, _ in pairs])
    ref_ensemble = vmap(ref_call, in_dims=(0, 0, None if shared_x else 0))
    if momentum is None:
        with pytest.raises(RuntimeError, match=r"\.item\(\)"):
            ref_ensemble(ref_params, ref_buffers, x)
    else:
        torch.testing.assert_close(ref_ensemble(ref_params, ref_buffers, x), got, **F64)


@pytest.mark.parametrize("stats", [True, False])
def test_ensemble_training_step(stats):
    """vmap(grad(loss)) over an ensemble of small CNNs: per-model gradients equal PyTorch's."""
    def net(cls):
        torch.manual_seed(7)
        m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), cls(3, track_running_stats=stats), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(12, 2)).double()
        randomize_(m[1])
        return m
    x = make_input((3, 6, 2, 4, 4), torch.float64)
    grads = []
    for cls in (torch.nn.BatchNorm2d, fastbn.BatchNorm2d):
        params, buffers, call = _ensemble([net(cls) for _ in range(3)])
        loss = grad(lambda p, b, x: call(p, b, x).pow(2).mean())
        grads.append(vmap(loss)(params, buffers, x))
        if stats:
            grads[-1]["running_mean"] = buffers["1.running_mean"]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], **F64)


def test_per_sample_gradients_eval():
    """vmap(grad) over single samples (per-sample gradients, eval mode) as PyTorch's."""
    ref, ours = _pair("cpu", False)
    x = _x("cpu", (6, 3, 3, 2))
    out = []
    for m in (ref, ours):
        params = dict(m.named_parameters())
        per_sample = grad(lambda p, x: functional_call(m, p, (x.unsqueeze(0),)).pow(3).sum())
        out.append(vmap(per_sample, in_dims=(None, 0))(params, x))
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], **F64)


@pytest.mark.parametrize("train", [True, False])
def test_fused_act_with_residual_under_vmap_and_grad(train):
    """BatchNormAct2d's relu(bn(x) + r) against torch's BatchNorm2d + add + relu."""
    ref, _ = _pair("cpu", train)
    ours = fastbn.BatchNormAct2d(3, dtype=torch.float64).train(train)
    ours.load_state_dict(ref.state_dict())
    xs, rs = make_input((4, 5, 3, 2, 2), torch.float64), make_input((4, 5, 3, 2, 2), torch.float64)
    if train:
        ref.track_running_stats = ours.track_running_stats = False
    refs = lambda x, r: F.relu(ref(x) + r)  # noqa: E731
    torch.testing.assert_close(vmap(ours)(xs, rs), vmap(refs)(xs, rs), **F64)
    g = [jacrev(f, argnums=(0, 1))(xs[0], rs[0]) for f in (refs, ours)]
    torch.testing.assert_close(g[1], g[0], **F64)


def test_functional_batch_norm_under_transforms():
    x = _x("cpu")
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    for training in (True, False):
        for fn in (F.batch_norm, fastbn.functional.batch_norm):
            fn.jac = jacrev(lambda x, w: fn(x, rm.clone(), rv.clone(), w, b, training), argnums=(0, 1))(x, w)
        torch.testing.assert_close(fastbn.functional.batch_norm.jac, F.batch_norm.jac, **F64)
    xs = make_input((5, 4, 3, 2), torch.float64)
    torch.testing.assert_close(vmap(lambda x: fastbn.functional.batch_norm(x, rm, rv, w, b, False))(xs),
                               vmap(lambda x: F.batch_norm(x, rm, rv, w, b, False))(xs), **F64)


def test_vmap_rules_of_the_ops_match_a_loop():
    """Each op's batching rule (fastbn/_vmap.py) against the op called once per sample, with
    some arguments batched (at dimension 0 or 1) and some shared; every output compared."""
    ops = fastbn.ops
    B, C = 3, 4
    x, dy, r = (make_input((B, 5, C, 2, 3), torch.float64) for _ in range(3))
    w, bias = torch.rand(B, C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    mean, invstd = torch.randn(C, B, dtype=torch.float64), torch.rand(B, C, dtype=torch.float64) + 0.5
    cases = [
        (ops.forward_train, (x, w, bias, r, None, None, None, 0.0, 1e-5, True), (0, 0, None, 0)),
        (ops.forward_eval, (x, mean, invstd, w, bias, r, 1e-5, True), (0, 1, 0, 0, None, 0)),
        (ops.backward_train, (dy, x, mean, invstd, w, bias, r, True, [True, True, True, True]),
         (0, 0, 1, 0, 0, None, 0)),
        (ops.backward_eval, (dy, x, mean, invstd, w, None, None, 1e-5, False, [True, True, False, False]),
         (0, 0, 1, 0, 0, None, None)),
        (ops.forward_composite, (x, w, bias, r, mean, invstd, False, 1e-5, True), (0, 0, None, 0, 1, 0)),
    ]
    for op, args, dims in cases:
        in_dims = dims + (None,) * (len(args) - len(dims))
        got = vmap(op, in_dims=in_dims)(*args)
        loop = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(B)]
        got = got if isinstance(got, tuple) else (got,)
        loop = [o if isinstance(o, tuple) else (o,) for o in loop]
        for k, g in enumerate(got):
            if g.numel() == 0:  # an output the mask left out
                continue
            torch.testing.assert_close(g, torch.stack([o[k] for o in loop]), **F64, msg=lambda s: f"{op} {k}: {s}")
