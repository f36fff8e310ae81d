"""ONNX export of eval-mode models with fastbn layers (fastbn/onnx.py): the exported graph is
standard ONNX (BatchNormalization, Add, Relu; no fastbn node) and, run in onnxruntime, gives
the fastbn model's eager output and the ONNX output of the same model built on
torch.nn.BatchNorm (exported by torch.onnx.export alone), at the export's batch size and at
another (dynamic batch)."""
import copy

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import torch  # noqa: E402

import fastbn  # noqa: E402
import fastbn.onnx  # noqa: E402
from fastbn.testing import tol  # noqa: E402

F32 = tol(torch.float32)
# torch.export's own deprecation warning (torch 2.13), not fastbn's.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")


class TorchBNAct(torch.nn.Module):
    """torch reference of a fastbn BatchNormAct layer: act(torch BatchNorm(x) + residual), with
    a copy of the layer's state."""

    def __init__(self, layer, bn_cls):
        super().__init__()
        self.bn = bn_cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                         track_running_stats=layer.track_running_stats)
        self.bn.load_state_dict(layer.state_dict())
        self.bn.train(layer.training)
        self.activation = layer.activation

    def forward(self, x, residual=None):
        y = self.bn(x) if residual is None else self.bn(x) + residual
        return torch.relu(y) if self.activation == "relu" else y


def torch_reference(model):
    """A copy of `model` on torch.nn.BatchNorm layers only (fastbn.revert, and TorchBNAct for
    the BatchNormAct layers)."""
    ref = fastbn.revert(copy.deepcopy(model))  # revert updates containers in place: a copy
    for name, m in list(ref.named_modules()):
        if isinstance(m, fastbn.modules._BatchNormAct):
            bn_cls = {fastbn.BatchNormAct1d: torch.nn.BatchNorm1d, fastbn.BatchNormAct2d: torch.nn.BatchNorm2d,
                      fastbn.BatchNormAct3d: torch.nn.BatchNorm3d}[type(m)]
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent), attr, TorchBNAct(m, bn_cls))
    assert not any(type(m).__module__.startswith("fastbn") for m in ref.modules())
    return ref


class CNN(torch.nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> BatchNormAct2d(residual) -> pool -> Linear ->
    BatchNorm1d on (N, C) input. `bn_kwargs` go to every fastbn layer."""

    def __init__(self, activation="relu", **bn_kwargs):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = fastbn.BatchNorm2d(8, **bn_kwargs)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = fastbn.BatchNormAct2d(8, activation=activation, **bn_kwargs)
        self.fc = torch.nn.Linear(8, 6)
        self.bn3 = fastbn.BatchNorm1d(6, **bn_kwargs)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h), h)
        return self.bn3(self.fc(h.mean((2, 3))))


def trained(model, shape, steps=4):
    """`model` after a few SGD steps in training mode on random data (offset and scaled, so the
    running statistics, checked here, and the parameters move from their initial values), in
    eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        out = model(torch.randn(shape) * 2 + 1)
        loss = (out - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in model.modules():
        if getattr(m, "running_var", None) is not None:
            assert (m.running_var - 1).abs().max() > 0.01 and m.running_mean.abs().max() > 0.01
    return model.eval()


def ort_run(model_proto, *inputs):
    """The outputs of an ONNX model (a ModelProto) in onnxruntime on the CPU, as torch tensors."""
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(y) for y in sess.run(None, feeds)]


def assert_standard_onnx(model_proto):
    """Every node in ONNX's default domain (no fastbn or other custom node), no local function."""
    domains = {n.domain for n in model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert not model_proto.functions
    onnx.checker.check_model(model_proto, full_check=True)


def check_export(model, shape, other_batch=7):
    """Exports the eval-mode `model` with fastbn.onnx.export (dynamic batch size) and its torch
    reference with torch.onnx.export; on fresh inputs of `shape` and of batch `other_batch`,
    onnxruntime's output of the fastbn export equals the fastbn model's eager output and
    onnxruntime's output of the torch reference's export."""
    x = torch.randn(shape) * 2 + 1
    dynamic = ({0: torch.export.Dim("batch", min=2)},)
    program = fastbn.onnx.export(model, (x,), dynamic_shapes=dynamic, verbose=False)
    assert_standard_onnx(program.model_proto)
    ref_program = torch.onnx.export(torch_reference(model), (x,), dynamo=True, dynamic_shapes=dynamic, verbose=False)
    for batch in (shape[0], other_batch):
        x = torch.randn((batch,) + tuple(shape[1:])) * 2 + 1
        with torch.no_grad():
            expected = model(x)
        (got,) = ort_run(program.model_proto, x)
        (ref,) = ort_run(ref_program.model_proto, x)
        torch.testing.assert_close(got, expected, **F32)
        torch.testing.assert_close(got, ref, **F32)


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"activation": None}],
                         ids=["affine", "no_affine", "no_activation"])
def test_cnn(kwargs):
    """The CNN (BatchNorm2d, BatchNormAct2d with residual, BatchNorm1d on (N, C)), float32, with
    affine parameters or without, BatchNormAct2d with relu or without (residual only)."""
    check_export(trained(CNN(**kwargs), (8, 3, 6, 6)), (4, 3, 6, 6))


def test_batchnorm3d():
    """BatchNorm3d and BatchNormAct3d (residual), and BatchNorm1d on (N, C, L) input."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3, padding=1)
            self.bn = fastbn.BatchNorm3d(4)
            self.conv2 = torch.nn.Conv3d(4, 4, 1)
            self.act = fastbn.BatchNormAct3d(4)
            self.bn1d = fastbn.BatchNorm1d(4)

        def forward(self, x):
            h = self.bn(self.conv(x))
            h = self.act(self.conv2(h) * 2 + 1, h)
            return self.bn1d(h.flatten(2))

    check_export(trained(Net(), (4, 2, 3, 4, 4)), (3, 2, 3, 4, 4))


def test_eval_without_running_stats():
    """Eval-mode layers with track_running_stats=False normalise with their batch's statistics
    (ReduceMean in the graph), next to layers with running statistics."""
    model = CNN()
    model.bn2 = fastbn.BatchNormAct2d(8, track_running_stats=False)
    model.bn3 = fastbn.BatchNorm1d(6, track_running_stats=False)
    check_export(trained(model, (8, 3, 6, 6)), (4, 3, 6, 6), other_batch=5)


def test_forward_train_outputs():
    """fastbn::forward_train without running statistics (traced as forward_batch_stats) gives all four
    outputs: out, batch mean, invstd = 1 / sqrt(var + eps), biased batch var."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(5) + 0.5)
            self.bias = torch.nn.Parameter(torch.randn(5))

        def forward(self, x, r):
            return torch.ops.fastbn.forward_train.default(x, self.weight, self.bias, r, None, None, None, 0.0, 1e-3,
                                                          True)

    model = Net().eval()
    x, r = torch.randn(4, 5, 3, 3) * 3 + 2, torch.randn(4, 5, 3, 3)
    program = fastbn.onnx.export(model, (x, r), verbose=False)
    assert_standard_onnx(program.model_proto)
    got = ort_run(program.model_proto, x, r)
    with torch.no_grad():
        expected = model(x, r)
    assert len(got) == 4
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **F32)


def test_graph_nodes_and_plain_torch_onnx_export():
    """torch.onnx.export with custom_translation_table=fastbn.onnx.TRANSLATIONS (no optimizer):
    one BatchNormalization per fastbn layer, the residual's Add and the two Relus; onnxruntime
    gives the eager output."""
    model = trained(CNN(), (8, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6)
    program = torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=fastbn.onnx.TRANSLATIONS,
                                optimize=False, verbose=False)
    assert_standard_onnx(program.model_proto)
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert ops.count("BatchNormalization") == 3
    assert ops.count("Relu") == 2 and ops.count("Add") == 1
    (got,) = ort_run(program.model_proto, x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), **F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    """float16/bfloat16 input with float32 weights and statistics (BatchNormAct2d, residual) and
    with weights and statistics in the input's dtype (BatchNorm2d): computed in float32 and
    rounded once, as fastbn's kernels do."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = fastbn.BatchNormAct2d(4)
            self.bn = fastbn.BatchNorm2d(4).to(dtype)

        def forward(self, x):  # float32 in and out: onnxruntime's Python API has no bfloat16 arrays
            h = x.to(dtype)
            return self.bn(self.act(h, h.flip(1))).float()

    model = trained(Net(), (8, 4, 5, 5))
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    program = fastbn.onnx.export(model, (x,), verbose=False)
    assert_standard_onnx(program.model_proto)
    (got,) = ort_run(program.model_proto, x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), **tol(dtype))


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_training_mode_is_refused():
    """A training-mode layer with running statistics: RuntimeError naming model.eval(), and the
    running statistics are not touched."""
    model = trained(CNN(), (8, 3, 6, 6)).train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"needs model\.eval\(\)"):
        fastbn.onnx.export(model, (torch.randn(4, 3, 6, 6),), verbose=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="dynamo"):
        fastbn.onnx.export(model.eval(), (torch.randn(4, 3, 6, 6),), dynamo=False)
