"""torch.fx, torch.jit.trace and torch.jit.script on models with fastbn's layers, each against
the same model with torch's layers: the traced or scripted model computes what the eager torch
model does, updates the same running statistics, and switches train/eval; where torch's own
layer fails under the tool (torch.nn.SyncBatchNorm under torch.jit.script), that is shown."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_states_equal, assert_step_matches, randomize_

import fastbn
from fastbn.testing import FASTBN, TORCH_BN

TOL = dict(rtol=1e-5, atol=1e-5)


class Net(torch.nn.Module):
    """conv -> BN -> relu, a fused BN+add+relu block, BatchNorm1d on 2-D features."""

    def __init__(self, bn2d, act2d, bn1d):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bn2d(6)
        self.conv2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.block = act2d(6)
        self.fc = torch.nn.Linear(6, 4)
        self.bn1d = bn1d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = self.block(self.conv2(y), y)
        return self.bn1d(self.fc(y.mean((2, 3))))


class TorchAct2d(torch.nn.BatchNorm2d):
    """torch's reference for fastbn.BatchNormAct2d: relu(bn(x) + residual)."""

    def forward(self, x, residual=None):
        return F.relu(super().forward(x) + residual)


def _pair(seed=0):
    torch.manual_seed(seed)
    ref = Net(torch.nn.BatchNorm2d, TorchAct2d, torch.nn.BatchNorm1d)
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            randomize_(m)
    ours = Net(fastbn.BatchNorm2d, fastbn.BatchNormAct2d, fastbn.BatchNorm1d)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_steps_match(ours, ref, steps=((True, 2), (False, 1), (True, 1))):
    """Runs both models through train/eval phases on the same fresh inputs: outputs, input
    gradients and the whole state (running statistics, num_batches_tracked) must agree."""
    for train, n in steps:
        ours.train(train)
        ref.train(train)
        for _ in range(n):
            assert_step_matches(ours, ref, torch.randn(5, 3, 6, 6) * 2 + 0.5, **TOL)
    assert_states_equal(ours, ref, **TOL)


def test_fx_symbolic_trace_makes_leaf_modules():
    ref, ours = _pair()
    gm = torch.fx.symbolic_trace(ours)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn", "conv2", "block", "fc",
                                                                          "bn1d"]
    block = next(n for n in gm.graph.nodes if n.target == "block")
    assert len(block.args) == 2  # (x, residual)
    assert isinstance(gm.get_submodule("block"), fastbn.BatchNormAct2d)
    _assert_steps_match(gm, ref)


def test_fx_leaf_whatever_the_tracer():
    """A tracer that traces into every module still gets one call_module node a fastbn layer
    (fastbn's layers are leaves as torch.nn's are to the default tracer)."""
    class Deep(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return False

    _, ours = _pair()
    graph = Deep().trace(ours)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["bn", "block", "bn1d"]


def test_fx_sync_frozen_and_functional():
    def fn(x, w):
        return fastbn.functional.batch_norm(x, None, None, w, None, True, activation="relu")

    gm = torch.fx.symbolic_trace(fn)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [fastbn.functional.batch_norm]
    x, w = torch.randn(4, 3, 5), torch.rand(3) + 0.5
    torch.testing.assert_close(gm(x, w), F.relu(F.batch_norm(x, None, None, w, None, True)), **TOL)
    seq = torch.nn.Sequential(fastbn.SyncBatchNorm(3), fastbn.FrozenBatchNorm2d(3), fastbn.BatchNorm2d(3))
    gm = torch.fx.symbolic_trace(seq)
    assert [n.op for n in gm.graph.nodes] == ["placeholder"] + ["call_module"] * 3 + ["output"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(gm(x), seq(x), **TOL)


def test_jit_trace_train_and_eval():
    """torch.jit.trace passes its own sanity check (check_trace: a second trace of the same
    inputs gives the same graph) in both modes, and the traced model trains as eager does."""
    for train in (True, False):
        ref, ours = _pair(1)
        ref.train(train)
        ours.train(train)
        x = torch.randn(5, 3, 6, 6)
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            traced = torch.jit.trace(ours, x, check_inputs=[(torch.randn(5, 3, 6, 6),)])
        ref_traced = torch.jit.trace(ref, x, check_trace=False)
        ref.load_state_dict(ours.state_dict())  # trace's runs updated ours' statistics (train)
        for _ in range(2):
            x = torch.randn(5, 3, 6, 6)
            torch.testing.assert_close(traced(x), ref_traced(x), **TOL)
        assert_states_equal(ours, ref, **TOL)


def _script_roundtrip(module):
    scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def test_jit_script_model_trains_and_evaluates():
    """A scripted model (saved and loaded) against the eager torch model."""
    ref, ours = _pair(2)
    _assert_steps_match(_script_roundtrip(ours), ref)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
                                    dict(bias=False)])
@pytest.mark.parametrize("kind", [1, 2, 3])
def test_jit_script_layers(kind, kwargs):
    ref = randomize_(TORCH_BN[kind](5, **kwargs))
    ours = FASTBN[kind](5, **kwargs)
    ours.load_state_dict(ref.state_dict())
    shape = {1: (6, 5), 2: (6, 5, 3, 2), 3: (6, 5, 2, 2, 2)}[kind]
    scripted = _script_roundtrip(ours)
    for train in (True, True, False):
        scripted.train(train)
        ref.train(train)
        x = torch.randn(shape)
        torch.testing.assert_close(scripted(x), ref(x), **TOL)
    assert_states_equal(scripted, ref, **TOL)
    with pytest.raises(Exception, match="expected"):
        scripted(torch.randn(2))


@pytest.mark.parametrize("activation", ["relu", None])
def test_jit_script_fused_and_frozen(activation):
    ref = randomize_(torch.nn.BatchNorm2d(4))
    ours = fastbn.BatchNormAct2d(4, activation=activation)
    ours.load_state_dict(ref.state_dict())
    scripted = _script_roundtrip(ours)
    act = F.relu if activation else (lambda t: t)
    for train in (True, False):
        scripted.train(train)
        ref.train(train)
        x, r = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(scripted(x, r), act(ref(x) + r), **TOL)
        torch.testing.assert_close(scripted(x), act(ref(x)), **TOL)
    frozen = fastbn.FrozenBatchNorm2d(4)
    frozen.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(_script_roundtrip(frozen)(x), ref.eval()(x), **TOL)


def test_jit_script_sync_batchnorm_eval_only():
    """torch.nn.SyncBatchNorm cannot be scripted; fastbn's can, for inference, and says so in
    training mode."""
    with pytest.raises(Exception):
        torch.jit.script(torch.nn.SyncBatchNorm(3))
    ref = randomize_(torch.nn.BatchNorm2d(3)).eval()
    ours = fastbn.SyncBatchNorm(3)
    ours.load_state_dict(ref.state_dict())
    scripted = _script_roundtrip(ours.eval())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(scripted(x), ref(x), **TOL)
    scripted.train()
    with pytest.raises(Exception, match="cannot synchronise ranks.*eval mode.*torch.compile"):
        scripted(x)
