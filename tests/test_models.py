"""Real models on the CPU: a model converted to fastbn trains like the unconverted one.

Each test builds a torch model, randomises every BatchNorm layer's parameters and buffers,
and makes fastbn's twin of it (``fastbn.convert``, plus fused ``BatchNormAct2d`` layers in the
small model). Both take the same SGD steps (momentum, weight decay) on the same fresh random
batches, then run in eval mode. Compared: the loss of every step, every parameter after the
steps, every running mean/variance (and num_batches_tracked, exactly), and the eval outputs.

float64: equal to 1e-10 (relative, per tensor). float32: rounding differences grow through
training (ReLU and max-pool decisions flip), so the bound is the drift torch shows against
itself: the same torch model, every parameter and buffer moved by 1 ulp, trained the same way.
fastbn's difference to torch must stay within DRIFT_FACTOR times that drift (per kind of
quantity) plus a floor at rounding level. Because that bound is loose where training is
chaotic, float32 also gets a tight check of the first step: every parameter's gradient is
compared with a float64 copy's, and fastbn's error must be at most GRAD_FACTOR times torch's
(plus GRAD_FLOOR), tensor by tensor: fastbn is never less accurate than torch.

torchvision's resnet18 runs where torchvision imports (the CUDA-build CI venv,
scripts/ci_cuda_build.sh); the small channels_last model runs everywhere.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastbn
from fastbn.testing import tol
from helpers import randomize_

STEPS = 4
F64_RTOL = 1e-10
DRIFT_FACTOR = 4.0
F32_FLOOR = 1e-6
GRAD_FACTOR = 3.0
GRAD_FLOOR = 1e-5
LR = 0.01
KINDS = ("loss", "eval output", "parameter", "running stats")


class TorchBNAct2d(torch.nn.BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) on torch's kernels: the reference for fastbn.BatchNormAct2d
    (same state_dict keys)."""

    def forward(self, input, residual=None):
        out = super().forward(input)
        return torch.relu(out if residual is None else out + residual)


class SmallNet(torch.nn.Module):
    """A residual CNN for 3x16x16 images with every BatchNorm flavour a CNN uses: fused BN+ReLU
    (bn_act), fused BN + residual add + ReLU, a plain BatchNorm2d on the shortcut, and a
    cumulative-average BatchNorm1d (momentum=None) in the head."""

    def __init__(self, bn_act, classes=10):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn_stem = bn_act(16)
        self.conv1 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = bn_act(32)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = bn_act(32)  # relu(bn2(conv2) + shortcut)
        self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, stride=2, bias=False),
                                            torch.nn.BatchNorm2d(32))
        self.fc1 = torch.nn.Linear(32, 24)
        self.bn_fc = torch.nn.BatchNorm1d(24, momentum=None)
        self.fc2 = torch.nn.Linear(24, classes)

    def forward(self, x):
        x = self.bn_stem(self.stem(x))
        h = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(h), residual=self.shortcut(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(torch.relu(self.bn_fc(self.fc1(x))))


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def randomized(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for m in bn_layers(model):
        randomize_(m, gen)
    return model


def one_ulp_up(model):
    """A copy of `model` with every floating parameter and buffer moved 1 ulp towards +inf."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            if t.is_floating_point():
                t.copy_(torch.nextafter(t, torch.full_like(t, float("inf"))))
    return out


def batches(shape, classes, dtype, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for _ in range(STEPS + 1):  # the last one is the eval batch
        x = (torch.randn(shape, generator=gen) * 1.5 + 0.3).to(dtype).contiguous(memory_format=fmt)
        out.append((x, torch.randint(0, classes, (shape[0],), generator=gen)))
    return out


def train_and_eval(model, data):
    """SGD with momentum and weight decay on data[:-1], then eval on data[-1]. Returns every
    compared quantity by name: "loss", "eval output", "parameter <name>", "running stats <name>"
    and the num_batches_tracked counters."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for x, y in data[:-1]:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        out = {"loss": torch.stack(losses), "eval output": model(data[-1][0])}
    for name, p in model.named_parameters():
        out[f"parameter {name}"] = p.detach().clone()
    for name, b in model.named_buffers():
        kind = "running stats" if b.is_floating_point() else "counter"
        out[f"{kind} {name}"] = b.clone()
    return out


def rel_err(a, b):
    """max |a - b| / max |b| (NaN when either holds a non-finite value)."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def kind_of(key):
    return next(k for k in KINDS if key.startswith(k))


def worst_by_kind(got, ref):
    """{kind: (largest rel_err over the tensors of that kind, the tensor's name)}."""
    worst = {}
    for key in ref:
        if key.startswith("counter"):
            continue
        e = rel_err(got[key], ref[key])
        kind = kind_of(key)
        if kind not in worst or not e <= worst[kind][0]:
            worst[kind] = (e, key)
    return worst


def first_step_gradient_errors(ref_model, fast_model, batch):
    """{parameter name: (fastbn's, torch's) gradient error against a float64 copy of the torch
    model} for one training step on `batch` (on copies: the models are left untouched)."""
    x, y = batch
    grads = {}
    for side, model in (("torch", ref_model), ("fastbn", fast_model), ("float64", ref_model)):
        m = copy.deepcopy(model).train()
        if side == "float64":
            m = m.double()
        F.cross_entropy(m(x.double() if side == "float64" else x), y).backward()
        grads[side] = {n: p.grad for n, p in m.named_parameters()}
    return {n: (rel_err(grads["fastbn"][n], g64), rel_err(grads["torch"][n], g64))
            for n, g64 in grads["float64"].items()}


def check_trains_like_torch(ref_model, fast_model, data, dtype, label):
    """Trains both models (and, in float32, torch's 1-ulp twin) and asserts the bounds of the
    module docstring. Returns (fastbn's worst errors, torch's drift) by kind, for the report."""
    n_bn = len(bn_layers(ref_model))
    assert sum(type(m).__module__.startswith("fastbn") for m in bn_layers(fast_model)) == n_bn
    drift_model = one_ulp_up(ref_model) if dtype == torch.float32 else None
    if dtype == torch.float32:
        for name, (e_fast, e_torch) in first_step_gradient_errors(ref_model, fast_model, data[0]).items():
            assert e_fast <= GRAD_FACTOR * e_torch + GRAD_FLOOR, (
                f"{label}: first-step gradient of {name} is {e_fast:.2e} from float64's (relative), "
                f"torch's is {e_torch:.2e}")
    ref = train_and_eval(ref_model, data)
    got = train_and_eval(fast_model, data)
    assert got.keys() == ref.keys()
    for key in ref:
        if key.startswith("counter"):
            assert torch.equal(got[key], ref[key]), (label, key)
    errs = worst_by_kind(got, ref)
    if dtype == torch.float64:
        for kind, (e, key) in errs.items():
            assert e <= F64_RTOL, f"{label}: {key} differs from torch by {e:.2e} (relative) > {F64_RTOL:g}"
        return errs, None
    drift = worst_by_kind(train_and_eval(drift_model, data), ref)
    for kind, (e, key) in errs.items():
        bound = DRIFT_FACTOR * drift[kind][0] + F32_FLOOR
        assert e <= bound, (f"{label}: {key} differs from torch by {e:.2e} (relative), more than {DRIFT_FACTOR:g} x "
                            f"torch's own 1-ulp drift {drift[kind][0]:.2e} ({drift[kind][1]}) + {F32_FLOOR:g}")
    return errs, drift


def report(label, errs, drift):
    parts = []
    for kind in KINDS:
        s = f"{kind} {errs[kind][0]:.1e}"
        if drift is not None:
            s += f" (1-ulp drift {drift[kind][0]:.1e})"
        parts.append(s)
    print(f"\n{label}: max rel. difference to torch: " + ", ".join(parts))


def small_net_pair(dtype):
    """(torch SmallNet, its fastbn twin with the same state), channels_last, in `dtype`."""
    torch.manual_seed(1)
    ref = randomized(SmallNet(TorchBNAct2d), seed=1).to(dtype).to(memory_format=torch.channels_last)
    fast = fastbn.convert(SmallNet(fastbn.BatchNormAct2d)).to(dtype).to(memory_format=torch.channels_last)
    fast.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, fastbn.BatchNormAct2d) for m in fast.modules()) == 3
    return ref, fast


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_small_channels_last_fused(dtype):
    ref, fast = small_net_pair(dtype)
    data = batches((16, 3, 16, 16), 10, dtype, channels_last=True, seed=2)
    errs, drift = check_trains_like_torch(ref, fast, data, dtype, f"small channels_last net, {dtype}")
    report(f"SmallNet channels_last fused {str(dtype)[6:]}", errs, drift)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("bug", ["momentum x 1.01", "eps x 1.5"])
def test_small_net_check_catches_a_seeded_bug(dtype, bug, monkeypatch):
    """The checks above can fail: a 1% error in the running-statistics momentum, or eps 1.5x
    too large, inside fastbn's module path."""
    import fastbn.modules as modules

    if bug == "momentum x 1.01":
        args = modules.running_args
        def scaled(m):  # the cumulative-average layer (momentum None) keeps its factor
            rm, rv, nbt, momentum = args(m)
            return rm, rv, nbt, None if momentum is None else momentum * 1.01

        monkeypatch.setattr(modules, "running_args", scaled)
    else:  # forward_train(input, weight, bias, residual, rm, rv, nbt, momentum, eps, relu)
        forward_ops = modules.forward_ops

        def seeded():
            train, evaluate = forward_ops()
            return (lambda *a: train(*a[:8], a[8] * 1.5, *a[9:])), evaluate

        monkeypatch.setattr(modules, "forward_ops", seeded)
    ref, fast = small_net_pair(dtype)
    data = batches((16, 3, 16, 16), 10, dtype, channels_last=True, seed=2)
    with pytest.raises(AssertionError, match="differs from torch|first-step gradient"):
        check_trains_like_torch(ref, fast, data, dtype, "seeded")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_resnet18(dtype):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = randomized(torchvision.models.resnet18(num_classes=10), seed=1).to(dtype)
    fast = fastbn.convert(copy.deepcopy(ref))
    assert len(bn_layers(fast)) == 20
    data = batches((8, 3, 64, 64), 10, dtype, channels_last=False, seed=2)
    errs, drift = check_trains_like_torch(ref, fast, data, dtype, f"resnet18, {dtype}")
    report(f"resnet18 {str(dtype)[6:]}", errs, drift)


def test_resnet18_calls_no_aten_batch_norm():
    """One training step of the converted resnet18 runs no ATen batch norm op (profiler trace),
    while the unconverted one does (so the check can fail)."""
    torchvision = pytest.importorskip("torchvision")
    from torch.profiler import ProfilerActivity, profile

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)

    def bn_ops(m):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m(x).sum().backward()
        return {e.name for e in prof.events() if e.name.startswith("aten::") and "batch_norm" in e.name}

    assert bn_ops(model)
    assert not bn_ops(fastbn.convert(copy.deepcopy(model)))


@pytest.mark.parametrize("train", [False, True])
def test_resnet18_feature_extractor(train):
    """torchvision's create_feature_extractor (FX) on the converted model gives the unconverted
    model's features, a BatchNorm layer's output among them (fastbn's layers are leaf
    modules, named as torch's are), in eval and in training mode."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = randomized(torchvision.models.resnet18(num_classes=10), seed=1).train(train)
    fast = fastbn.convert(copy.deepcopy(ref))
    nodes = {"layer1": "c2", "layer2.0.bn2": "bn", "layer3": "c4", "fc": "logits"}
    x = torch.randn(2, 3, 64, 64)
    got_model = create_feature_extractor(fast, return_nodes=nodes)
    got = got_model(x)
    want = create_feature_extractor(ref, return_nodes=nodes)(x)
    for k in nodes.values():  # training mode: batch statistics, float rounding through 3 stages
        torch.testing.assert_close(got[k], want[k], **tol(torch.float32))
    assert isinstance(got_model.get_submodule("layer2.0.bn2"), fastbn.BatchNorm2d)
