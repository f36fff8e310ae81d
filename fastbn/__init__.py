"""fastbn: drop-in BatchNorm for PyTorch on hand-written CPU and CUDA kernels.

    import fastbn
    bn = fastbn.BatchNorm2d(64)          # same arguments as torch.nn.BatchNorm2d
    y = bn(torch.randn(8, 64, 32, 32))
"""
from . import functional
from ._ops import ops
from .convert import convert
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "SyncBatchNorm", "convert", "functional", "ops", "cpu_isa", "built_with_cuda",
]


def cpu_isa():
    """Instruction set of the CPU kernels in use: ``'avx2'`` or ``'base'``."""
    from . import _C

    return _C.cpu_isa()


def built_with_cuda():
    """Whether this build of fastbn contains its CUDA kernels."""
    from . import _C

    return _C.built_with_cuda()
