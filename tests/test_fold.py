"""fastbn.fold against PyTorch's own tools on the same models: small CNNs with torch's
BatchNorm layers, trained a few steps on random data (running statistics and affine
parameters away from their initial values), and their fastbn twins (fastbn.convert).

- torch.ao.quantization.fuse_modules (eval) and fuse_modules_qat (train) on the fastbn
  model give the same module types and outputs as on the torch model (register_fusers);
- FX graph mode: fuse_fx and prepare_qat_fx with fastbn.fold.backend_config();
- fold_into_conv: same outputs as the eager model and torch.fx.experimental.optimization.fuse,
  no foldable BatchNorm left; BatchNormAct with residual / activation None, bias-free,
  grouped, Conv1d/3d, Linear + BatchNorm1d; training mode rejected; what cannot be folded
  left alone."""
import copy
import operator

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.nn as nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat, fuser_method_mappings
from torch.fx.experimental.optimization import fuse as torch_fx_fuse

import fastbn
from fastbn.fold import backend_config, fold_into_conv, register_fusers
from fastbn.testing import FASTBN, TORCH_BN, tol

register_fusers()  # what `import fastbn` does once wired; registering again changes nothing

TOL = tol(torch.float32)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
ACT = {1: fastbn.BatchNormAct1d, 2: fastbn.BatchNormAct2d, 3: fastbn.BatchNormAct3d}
SIZE = {1: (12,), 2: (6, 6), 3: (4, 4, 4)}
TORCH_OF = {FASTBN[k]: TORCH_BN[k] for k in FASTBN}


class Net(nn.Module):
    """conv + bn + relu; grouped, bias-free, reflect-padded conv + bn with a skip; (optionally)
    transposed conv + bn + relu; Linear + BatchNorm1d. All BatchNorm layers torch's."""

    def __init__(self, d, transpose=True):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = CONV[d](3, 8, 3, padding=1), TORCH_BN[d](8), nn.ReLU()
        self.conv2 = CONV[d](8, 8, 3, padding=1, groups=4, bias=False, padding_mode="reflect")
        self.bn2 = TORCH_BN[d](8)
        self.transpose = transpose
        if transpose:
            self.up, self.bn3, self.relu3 = CONVT[d](8, 8, 2, stride=2), TORCH_BN[d](8), nn.ReLU()
        self.fc, self.bn4 = nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x)) + x
        if self.transpose:
            x = self.relu3(self.bn3(self.up(x)))
        return self.bn4(self.fc(x.flatten(2).mean(2)))


class ActNet(nn.Module):
    """fastbn.BatchNormAct after convolutions and a Linear: relu; relu with a residual;
    activation None with a residual (given by keyword); activation None alone."""

    def __init__(self, d):
        super().__init__()
        self.conv1, self.bn1 = CONV[d](3, 8, 3, padding=1), ACT[d](8)
        self.conv2, self.bn2 = CONV[d](8, 8, 3, padding=1, bias=False), ACT[d](8)
        self.conv3, self.bn3 = CONV[d](8, 8, 1, groups=8), ACT[d](8, activation=None)
        self.conv4, self.bn4 = CONV[d](8, 8, 1, bias=False), ACT[d](8, activation=None)
        self.fc, self.bn5 = nn.Linear(8, 5), fastbn.BatchNormAct1d(5)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.conv2(y), y)
        y = self.bn3(self.conv3(y), residual=y)
        y = self.bn4(self.conv4(y))
        return self.bn5(self.fc(y.flatten(2).mean(2)))


def _input(d, n=4):
    return torch.randn(n, 3, *SIZE[d])


def _trained(model, d, steps=3):
    """`model` after a few SGD steps on random data, in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        out = model(_input(d, 8))
        (out - torch.randn_like(out)).pow(2).mean().backward()
        opt.step()
    return model.eval()


def _models(d, transpose=True):
    """(trained torch model, its fastbn twin), both in eval mode."""
    torch.manual_seed(d)
    ref = _trained(Net(d, transpose), d)
    model = fastbn.convert(copy.deepcopy(ref))
    assert type(model.bn1) is FASTBN[d] and type(model.bn4) is fastbn.BatchNorm1d
    return ref, model


def _types(model):
    """(name, class) of every submodule but the root, fastbn's BatchNorm classes as torch's."""
    return [(name, TORCH_OF.get(type(m), type(m))) for name, m in model.named_modules() if name]


def _batchnorms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_register_fusers_idempotent():
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    before = dict(table)
    register_fusers()
    assert table == before
    for d in (1, 2, 3):
        for key in [(CONV[d], FASTBN[d]), (CONV[d], FASTBN[d], nn.ReLU), (CONVT[d], FASTBN[d])]:
            assert key in table
    assert (nn.Linear, fastbn.BatchNorm1d) in table and (fastbn.BatchNorm2d, nn.ReLU) in table


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fuse_modules_eval(d):
    ref, model = _models(d)
    x = _input(d)
    groups = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["up", "bn3"], ["fc", "bn4"]]
    fused_ref, fused = fuse_modules(ref, groups), fuse_modules(model, groups)
    assert _types(fused) == _types(fused_ref)
    assert type(fused.conv1) is {1: nni.ConvReLU1d, 2: nni.ConvReLU2d, 3: nni.ConvReLU3d}[d]
    assert type(fused.conv2) is CONV[d] and type(fused.up) is CONVT[d] and type(fused.fc) is nn.Linear
    assert not _batchnorms(fused)
    out = fused(x)
    torch.testing.assert_close(out, fused_ref(x), **TOL)
    torch.testing.assert_close(out, model(x), **TOL)
    if d > 1:  # torch fuses BatchNorm + ReLU for 2d and 3d only
        bn_relu, bn_relu_ref = fuse_modules(model, ["bn3", "relu3"]), fuse_modules(ref, ["bn3", "relu3"])
        assert type(bn_relu.bn3) is type(bn_relu_ref.bn3) is {2: nni.BNReLU2d, 3: nni.BNReLU3d}[d]
        assert type(bn_relu.bn3[0]) is TORCH_BN[d]
        torch.testing.assert_close(bn_relu(x), bn_relu_ref(x), **TOL)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fuse_modules_qat(d):
    ref, model = _models(d, transpose=False)
    ref.train(), model.train()
    x = _input(d)
    groups = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["fc", "bn4"]]
    fused_ref, fused = fuse_modules_qat(ref, groups), fuse_modules_qat(model, groups)
    assert _types(fused) == _types(fused_ref)
    assert type(fused.conv1) is {1: nni.ConvBnReLU1d, 2: nni.ConvBnReLU2d, 3: nni.ConvBnReLU3d}[d]
    assert type(fused.conv2) is {1: nni.ConvBn1d, 2: nni.ConvBn2d, 3: nni.ConvBn3d}[d]
    assert type(fused.fc) is nni.LinearBn1d and type(fused.conv1[1]) is TORCH_BN[d]
    out, out_ref = fused(x), fused_ref(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    out.pow(2).sum().backward()
    out_ref.pow(2).sum().backward()
    for name in ("conv1", "conv2", "fc"):
        bn, bn_ref = getattr(fused, name)[1], getattr(fused_ref, name)[1]
        torch.testing.assert_close(bn.running_var, bn_ref.running_var, **TOL)
        torch.testing.assert_close(bn.weight.grad, bn_ref.weight.grad, **TOL)


def test_fx_graph_mode():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import fuse_fx, prepare_qat_fx

    ref, model = _models(2, transpose=False)
    x = _input(2)
    config = backend_config()
    fused_ref, fused = fuse_fx(copy.deepcopy(ref)), fuse_fx(copy.deepcopy(model), backend_config=config)
    assert _types(fused) == _types(fused_ref) and type(fused.conv1) is nni.ConvReLU2d
    torch.testing.assert_close(fused(x), fused_ref(x), **TOL)
    torch.testing.assert_close(fused(x), model(x), **TOL)

    qconfig = get_default_qat_qconfig_mapping("x86")
    prepared_ref = prepare_qat_fx(copy.deepcopy(ref).train(), qconfig, (x,))
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), qconfig, (x,), backend_config=config)
    assert _types(prepared) == _types(prepared_ref)
    assert type(prepared.conv1) is nniqat.ConvBnReLU2d and type(prepared.conv2) is nniqat.ConvBn2d
    torch.testing.assert_close(prepared(x), prepared_ref(x), **TOL)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fold_into_conv(d):
    ref, model = _models(d)
    x = _input(d)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_into_conv(model)
    assert isinstance(folded, torch.fx.GraphModule)
    assert _batchnorms(folded) == ["bn3"]  # after the transposed convolution: not folded
    out = folded(x)
    torch.testing.assert_close(out, model(x), **TOL)
    torch.testing.assert_close(out, torch_fx_fuse(ref)(x), **TOL)
    torch.testing.assert_close(fold_into_conv(ref)(x), out, **TOL)  # torch's BatchNorm layers too
    torch.testing.assert_close(fold_into_conv(torch.fx.symbolic_trace(model))(x), out, **TOL)
    # The model itself is unchanged.
    assert type(model.bn1) is FASTBN[d] and type(model.bn4) is fastbn.BatchNorm1d
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fold_batchnorm_act(d):
    torch.manual_seed(10 + d)
    model = _trained(ActNet(d), d)
    x = _input(d)
    folded = fold_into_conv(model)
    assert not _batchnorms(folded)
    calls = [n.target for n in folded.graph.nodes if n.op == "call_function"]
    assert calls.count(operator.add) == 2 and calls.count(torch.relu) == 3
    torch.testing.assert_close(folded(x), model(x), **TOL)


def test_training_mode_rejected():
    _, model = _models(2)
    with pytest.raises(ValueError, match="the model is in training mode.*model.eval()"):
        fold_into_conv(copy.deepcopy(model).train())
    model.bn2.train()
    with pytest.raises(ValueError, match="submodule 'bn2' is in training mode"):
        fold_into_conv(model)


class Unfoldable(nn.Module):
    """BatchNorm layers that cannot be folded, and one (bn6) that can."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), fastbn.BatchNorm2d(8, track_running_stats=False)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), fastbn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), fastbn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 1), fastbn.BatchNormAct2d(8)
        self.conv5, self.bn5 = nn.Conv2d(8, 8, 1), fastbn.BatchNormAct2d(8, activation=None)
        self.conv6, self.bn6 = nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn1(self.conv1(x))  # batch statistics in eval mode too
        c = self.conv2(y)
        y = self.bn2(c) + c  # the convolution's output has another user
        y = self.bn3(self.conv3(y)) + self.conv3(x.new_ones(()) + y)  # the convolution runs twice
        y = self.bn4(self.conv4(y), y * self.conv4.weight.sum())  # its weight is read elsewhere
        c = self.conv5(y)
        y = self.bn5(c, c)  # the convolution's output is also the residual
        return self.bn6(self.conv6(y))


def test_unfoldable_left_alone():
    torch.manual_seed(3)
    model = _trained(Unfoldable(), 2)
    x = _input(2)
    folded = fold_into_conv(model)
    assert _batchnorms(folded) == ["bn1", "bn2", "bn3", "bn4", "bn5"]
    torch.testing.assert_close(folded(x), model(x), **TOL)


def test_fold_frozen_batchnorm():
    """fastbn.FrozenBatchNorm2d (detection backbones) folds as a BatchNorm2d in eval mode."""
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    ref = _trained(ref, 2).eval()
    frozen = fastbn.FrozenBatchNorm2d(8)
    frozen.load_state_dict(ref[1].state_dict())
    model = nn.Sequential(copy.deepcopy(ref[0]), frozen, nn.ReLU()).eval()
    x = _input(2)
    folded = fold_into_conv(model)
    assert not [m for m in folded.modules() if isinstance(m, fastbn.FrozenBatchNorm2d)]
    torch.testing.assert_close(folded(x), model(x), **TOL)
    torch.testing.assert_close(folded(x), ref(x), **TOL)
