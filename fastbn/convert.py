"""``fastbn.convert``: swap torch's BatchNorm layers in a model for fastbn's twins;
``fastbn.revert``: the reverse, for tools that need torch's own classes."""
import sys

import torch

from .frozen import FrozenBatchNorm2d
from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

# torch's class -> fastbn's twin.
_TWINS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
          torch.nn.LazyBatchNorm1d: LazyBatchNorm1d, torch.nn.LazyBatchNorm2d: LazyBatchNorm2d,
          torch.nn.LazyBatchNorm3d: LazyBatchNorm3d}


def _twins():
    """_TWINS with torchvision's FrozenBatchNorm2d where torchvision is imported (a model can
    hold one only then)."""
    misc = sys.modules.get("torchvision.ops.misc")
    return {**_TWINS, misc.FrozenBatchNorm2d: FrozenBatchNorm2d} if misc is not None else _TWINS


def _blank_twin(module, cls, process_group):
    """A ``cls`` layer with ``module``'s settings (its tensors are replaced next)."""
    if not hasattr(module, "momentum"):  # FrozenBatchNorm2d: eps and four buffers
        return cls(module.weight.shape[0], eps=module.eps)
    from .sync import SyncBatchNorm

    kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats)
    if module.affine and module.bias is None:
        kwargs["bias"] = False
    if issubclass(cls, (torch.nn.SyncBatchNorm, SyncBatchNorm)):
        kwargs["process_group"] = process_group if process_group is not None else getattr(module, "process_group",
                                                                                           None)
    if issubclass(cls, torch.nn.modules.lazy.LazyModuleMixin):  # num_features inferred at the first call
        return cls(device="meta", **kwargs)
    return cls(module.num_features, device="meta", **kwargs)


def _twin_of(module, cls, process_group=None):
    """A ``cls`` layer sharing ``module``'s parameters, buffers, mode and settings."""
    twin = _blank_twin(module, cls, process_group)
    # The very same Parameter and buffer objects (uninitialised ones of a lazy layer included):
    # device, dtype, requires_grad and optimizer references are preserved.
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if hasattr(module, name):
            setattr(twin, name, getattr(module, name))
    twin.train(module.training)
    if hasattr(module, "qconfig"):
        twin.qconfig = module.qconfig
    return twin


def replace_batchnorms(module, pick, process_group=None):
    """Returns ``module`` with every submodule ``m`` for which ``pick(m)`` names a class
    replaced by a twin of that class. Containers are updated in place, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does; if ``module`` itself is
    replaced, the twin is returned."""
    cls = pick(module)
    out = _twin_of(module, cls, process_group) if cls is not None else module
    for name, child in module.named_children():
        out.add_module(name, replace_batchnorms(child, pick, process_group))
    return out


def convert(module, sync_batchnorm=False, process_group=None):
    """Returns ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` and
    ``torch.nn.LazyBatchNorm1d/2d/3d`` (not yet materialised) replaced by its fastbn twin,
    torchvision's ``FrozenBatchNorm2d`` by ``fastbn.FrozenBatchNorm2d`` (and, with
    ``sync_batchnorm=True``, every ``torch.nn.SyncBatchNorm`` by ``fastbn.SyncBatchNorm``). The twins share the original parameters and buffers, so
    device, dtype, requires_grad, train/eval mode and optimizer state carry over; all other
    modules are untouched (only exact torch classes are replaced, not subclasses). If
    ``module`` is itself such a layer, its twin is returned."""
    from .sync import SyncBatchNorm

    twins = _twins()

    def pick(m):
        if type(m) in twins:
            return twins[type(m)]
        if sync_batchnorm and type(m) is torch.nn.SyncBatchNorm:
            return SyncBatchNorm
        return None

    return replace_batchnorms(module, pick, process_group)


def revert(module):
    """Returns ``module`` with every fastbn BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d and
    SyncBatchNorm replaced by torch's class of the same name, and FrozenBatchNorm2d by
    torchvision's (where torchvision is installed), sharing parameters and buffers (as
    ``convert`` does, in the other direction): for tools that match torch's exact classes.
    fastbn's BatchNormAct*d layers have no torch equivalent and are left as they are."""
    from .sync import SyncBatchNorm

    if any(type(m) is FrozenBatchNorm2d for m in module.modules()):
        try:  # torchvision's class, where torchvision is installed
            import torchvision.ops  # noqa: F401
        except ImportError:
            pass
    back = {v: k for k, v in _twins().items()}
    back[SyncBatchNorm] = torch.nn.SyncBatchNorm
    return replace_batchnorms(module, lambda m: back.get(type(m)))
