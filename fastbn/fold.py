"""Convolution + BatchNorm folding with fastbn layers, for inference and quantization.

``register_fusers()``: torch.ao.quantization's eager-mode ``fuse_modules`` and
``fuse_modules_qat`` accept fastbn's BatchNorm1d/2d/3d wherever they accept torch's.
``backend_config()``: the same for FX graph mode (``fuse_fx``, ``prepare_fx``,
``prepare_qat_fx``), passed as their ``backend_config``.
``fold_into_conv(model)``: a traced inference copy of an eval-mode model with every
BatchNorm (fastbn's, BatchNormAct included, or torch's) that follows a convolution or
Linear folded into its weight and bias.
"""
import copy
import operator

import torch
from torch.ao.quantization import fuser_method_mappings
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.nn.utils.parametrize import is_parametrized

from .convert import _TWINS, revert
from .frozen import FrozenBatchNorm2d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

__all__ = ["register_fusers", "backend_config", "fold_into_conv"]


def _fastbn_pattern(pattern):
    """`pattern` (a tuple of module classes and functions, as torch.ao keys its fusions) with
    torch's BatchNorm1d/2d/3d replaced by fastbn's twins; None when it has none of them."""
    if not isinstance(pattern, tuple) or not any(p in _TWINS for p in pattern):
        return None
    return tuple(_TWINS.get(p, p) for p in pattern)


def _on_torch_twins(fuser_method):
    """torch's `fuser_method`, called with fastbn's layers replaced by their torch twins
    (``fastbn.revert``: the same parameters and buffers). torch's fused intrinsic modules
    (``ConvBn2d``, ``BNReLU2d``...) require torch's exact BatchNorm classes, so the result
    is exactly the module torch makes for its own layers."""

    def fuser(is_qat, *modules):
        return fuser_method(is_qat, *(revert(m) for m in modules))

    fuser.__name__ = fuser.__qualname__ = f"fastbn_{getattr(fuser_method, '__name__', 'fuser')}"
    return fuser


def register_fusers():
    """Adds to torch.ao.quantization's eager-mode fuser table (the one ``fuse_modules`` and
    ``fuse_modules_qat`` look module-type tuples up in) an entry for every fusion torch has
    for its own BatchNorm1d/2d/3d, with fastbn's twin in its place: (ConvNd, BatchNormNd)
    (+ ReLU), (Linear, BatchNorm1d), (ConvTransposeNd, BatchNormNd), (BatchNorm2d/3d, ReLU).
    The fused modules are torch's (see ``_on_torch_twins``). Idempotent; entries already
    present are kept."""
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for pattern, method in list(table.items()):
        ours = _fastbn_pattern(pattern)
        if ours is not None and ours not in table:
            table[ours] = _on_torch_twins(method)


def backend_config(base=None):
    """`base` (by default torch's native BackendConfig, the one FX graph mode uses when given
    none) plus, for each of its fusion patterns that has a torch BatchNorm1d/2d/3d, the same
    pattern with fastbn's twin in its place, fused as torch fuses its own. For FX graph mode:
    ``fuse_fx(model, backend_config=fastbn.fold.backend_config())``, likewise ``prepare_fx``,
    ``prepare_qat_fx`` and ``convert_fx``. (FX graph mode rebuilds its default config on
    every call, so there is no table to register into, unlike eager mode.)"""
    # backend_config.utils first: building a BackendConfig needs it, and the package does not
    # import it itself (torch 2.13).
    import torch.ao.quantization.backend_config.utils  # noqa: F401
    from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, get_native_backend_config

    base = get_native_backend_config() if base is None else base
    configs = list(base.configs)
    for config in base.configs:
        ours = _fastbn_pattern(config.pattern)
        if ours is not None and config.fuser_method is not None:
            spec = config.to_dict()
            spec["pattern"], spec["fuser_method"] = ours, _on_torch_twins(config.fuser_method)
            configs.append(BackendPatternConfig.from_dict(spec))
    return BackendConfig(base.name).set_backend_pattern_configs(configs)


# Layers a BatchNorm is folded into: output channel c is row c of the weight.
_FOLD_INTO = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
_BATCHNORMS = (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
               FrozenBatchNorm2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _used_elsewhere(graph, node):
    """Whether a node of `graph` other than `node` (a call_module node) calls or reads its
    module, a submodule or attribute of it, or a module containing it."""
    path = node.target
    return any(n is not node and n.op in ("call_module", "get_attr")
               and (n.target == path or n.target.startswith(path + ".") or path.startswith(n.target + "."))
               for n in graph.nodes)


def _foldable(node, modules):
    """(layer node, BatchNorm, residual) when `node` calls a BatchNorm with running
    statistics whose input is the output of a Conv1d/2d/3d or Linear that nothing else
    uses, and the layer's module is not used anywhere else in the graph; else None."""
    if node.op != "call_module" or type(modules.get(node.target)) not in _BATCHNORMS or not node.args:
        return None
    bn, src = modules[node.target], node.args[0]
    residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
    if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and type(modules.get(src.target)) in _FOLD_INTO):
        return None
    layer = modules[src.target]
    if len(src.users) != 1 or residual is src or is_parametrized(layer) or _used_elsewhere(node.graph, src):
        return None
    # Without running statistics a BatchNorm normalises by the batch's, in eval mode too.
    if bn.running_mean is None or bn.running_var is None or bn.running_mean.numel() != layer.weight.shape[0]:
        return None
    return src, bn, residual


def fold_into_conv(model):
    """An inference copy of the eval-mode `model`, as a ``torch.fx.GraphModule`` (as
    ``torch.fx.experimental.optimization.fuse`` returns; `model` is traced with
    ``torch.fx.symbolic_trace``, a GraphModule is taken as it is), in which every BatchNorm
    whose input is the output of a Conv1d/2d/3d (any groups, bias or padding mode) or Linear
    used by nothing else is folded into that layer's weight and bias:

    - fastbn.BatchNorm1d/2d/3d, fastbn.FrozenBatchNorm2d, torch.nn.BatchNorm1d/2d/3d:
      ``bn(conv(x))`` -> ``conv'(x)``;
    - fastbn.BatchNormAct1d/2d/3d: ``bn(conv(x), r)`` -> ``relu(conv'(x) + r)``, with
      ``operator.add`` and ``torch.relu`` nodes (no add without a residual, no relu with
      ``activation=None``).

    Left as they are: BatchNorm layers without running statistics (``track_running_stats=
    False``: they use the batch's statistics in eval mode too), layers whose output has other
    users, and layers whose module the graph uses elsewhere. Linear + BatchNorm1d assumes the
    Linear's output is (N, features), as torch's fusions do: the BatchNorm's channels are the
    Linear's output features. `model` itself is not changed (it is deep-copied).

    Raises ValueError when `model` or any submodule is in training mode: folding uses the
    running statistics, which only eval mode uses."""
    training = next((name for name, m in model.named_modules() if m.training), None)
    if training is not None:
        where = f"submodule {training!r}" if training else "the model"
        raise ValueError(f"fastbn.fold_into_conv: {where} is in training mode; folding uses the running "
                         f"statistics, which only eval mode uses: call model.eval() first")
    model = copy.deepcopy(model)
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    graph, modules = gm.graph, dict(gm.named_modules())
    for node in list(graph.nodes):
        match = _foldable(node, modules)
        if match is None:
            continue
        src, bn, residual = match
        layer = modules[src.target]
        layer.weight, layer.bias = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                                        bn.eps, bn.weight, bn.bias)
        out = src
        with graph.inserting_before(node):
            if residual is not None:
                out = graph.call_function(operator.add, (out, residual))
            if getattr(bn, "activation", None) == "relu":
                out = graph.call_function(torch.relu, (out,))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    # A new GraphModule keeps only the submodules its graph uses: the folded BatchNorms go.
    return torch.fx.GraphModule(gm, graph)
