"""``fastbn.LazyBatchNorm1d/2d/3d``: ``torch.nn.LazyBatchNorm1d/2d/3d`` (subclasses, same
constructor) whose first call infers ``num_features`` from the input and turns the layer into
fastbn's ``BatchNorm1d/2d/3d`` (``cls_to_become``); every call, the first included, runs on
fastbn's kernels."""
import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d


class LazyBatchNorm1d(torch.nn.LazyBatchNorm1d):
    """Becomes ``fastbn.BatchNorm1d`` at its first call."""

    cls_to_become = BatchNorm1d
    forward = BatchNorm1d.forward


class LazyBatchNorm2d(torch.nn.LazyBatchNorm2d):
    """Becomes ``fastbn.BatchNorm2d`` at its first call."""

    cls_to_become = BatchNorm2d
    forward = BatchNorm2d.forward


class LazyBatchNorm3d(torch.nn.LazyBatchNorm3d):
    """Becomes ``fastbn.BatchNorm3d`` at its first call."""

    cls_to_become = BatchNorm3d
    forward = BatchNorm3d.forward
