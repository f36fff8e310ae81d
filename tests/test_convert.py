"""fastbn.convert on a small ResNet-style model: every torch BatchNorm replaced by its
fastbn twin sharing parameters/buffers; same outputs and gradients before and after;
device, dtype, requires_grad and train/eval mode preserved; other modules untouched."""
import copy

import pytest
import torch
from helpers import DEVICES

import fastbn


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c, momentum=None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class TinyResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(Block(8), Block(8))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 16), torch.nn.BatchNorm1d(16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert_resnet(device, dtype):
    ref = _randomize(TinyResNet()).to(device, dtype)
    ref.blocks[1].bn1.weight.requires_grad_(False)
    ref.head[2].eval()
    model = copy.deepcopy(ref)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    old_bn = model.blocks[0].bn1
    out = fastbn.convert(model)
    assert out is model
    kinds = {type(m) for m in out.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {fastbn.BatchNorm1d, fastbn.BatchNorm2d}
    assert [m for m in out.modules() if isinstance(m, torch.nn.Conv2d)] == convs  # untouched, same objects
    new_bn = out.blocks[0].bn1
    assert new_bn.weight is old_bn.weight and new_bn.running_var is old_bn.running_var
    assert not out.blocks[1].bn1.weight.requires_grad
    assert not out.head[2].training and out.stem[1].training
    assert out.blocks[0].bn2.momentum is None
    for p in out.parameters():
        assert p.device.type == device and p.dtype == dtype
    for step in range(2):
        x = torch.randn(4, 3, 6, 6, device=device, dtype=dtype)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), out(xo)
        t = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(yo, yr, **t)
        g = torch.randn_like(yr)
        yr.backward(g)
        yo.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad, **t)
        for (name, pr), po in zip(ref.named_parameters(), out.parameters()):
            if pr.requires_grad:
                torch.testing.assert_close(po.grad, pr.grad, **t, msg=lambda m: f"{name}: {m}")
            else:
                assert po.grad is None
        for (name, br), bo in zip(ref.named_buffers(), out.buffers()):
            torch.testing.assert_close(bo, br, **t, msg=lambda m: f"{name}: {m}")
    ref.eval()
    out.eval()
    x = torch.randn(4, 3, 6, 6, device=device, dtype=dtype)
    torch.testing.assert_close(out(x), ref(x))


def test_convert_top_level_and_sync_option():
    bn = torch.nn.BatchNorm3d(3, affine=False, track_running_stats=False)
    twin = fastbn.convert(bn)
    assert type(twin) is fastbn.BatchNorm3d and twin.weight is None and twin.running_mean is None
    net = torch.nn.Sequential(torch.nn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4, bias=False))
    plain = fastbn.convert(copy.deepcopy(net))
    assert type(plain[0]) is torch.nn.SyncBatchNorm and type(plain[1]) is fastbn.BatchNorm2d
    assert plain[1].bias is None
    synced = fastbn.convert(copy.deepcopy(net), sync_batchnorm=True)
    assert type(synced[0]) is fastbn.SyncBatchNorm


def test_convert_leaves_subclasses_alone():
    class MyBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = torch.nn.Sequential(MyBN(3))
    assert type(fastbn.convert(net)[0]) is MyBN
