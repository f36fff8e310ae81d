"""``fastbn.convert``: swap torch's BatchNorm layers in a model for fastbn's twins."""
import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

_TWINS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}


def _twin_of(module, cls, process_group=None):
    """A ``cls`` layer sharing ``module``'s parameters, buffers, mode and settings."""
    kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats)
    if module.affine and module.bias is None:
        kwargs["bias"] = False
    if issubclass(cls, torch.nn.SyncBatchNorm):
        kwargs["process_group"] = process_group if process_group is not None else getattr(module, "process_group",
                                                                                           None)
    twin = cls(module.num_features, device="meta", **kwargs)
    # The very same Parameter and buffer objects: device, dtype, requires_grad and optimizer
    # references are preserved.
    twin.weight, twin.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
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
    """Returns ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` replaced by its fastbn
    twin (and, with ``sync_batchnorm=True``, every ``torch.nn.SyncBatchNorm`` by
    ``fastbn.SyncBatchNorm``). The twins share the original parameters and buffers, so
    device, dtype, requires_grad, train/eval mode and optimizer state carry over; all other
    modules are untouched (only exact torch classes are replaced, not subclasses). If
    ``module`` is itself such a layer, its twin is returned."""
    from .sync import SyncBatchNorm

    def pick(m):
        if type(m) in _TWINS:
            return _TWINS[type(m)]
        if sync_batchnorm and type(m) is torch.nn.SyncBatchNorm:
            return SyncBatchNorm
        return None

    return replace_batchnorms(module, pick, process_group)
