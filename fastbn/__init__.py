"""fastbn: drop-in BatchNorm for PyTorch on hand-written CPU and CUDA kernels.

    import fastbn
    bn = fastbn.BatchNorm2d(64)          # same arguments as torch.nn.BatchNorm2d
    y = bn(torch.randn(8, 64, 32, 32))
"""
from . import functional
from ._ops import ops
from .convert import convert, revert
from .fold import fold_into_conv, register_fusers
from .frozen import FrozenBatchNorm2d
from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "FrozenBatchNorm2d", "SyncBatchNorm", "convert",
    "revert", "fold_into_conv", "functional", "ops", "cpu_isa", "built_with_cuda",
]

# torch.ao.quantization.fuse_modules / fuse_modules_qat accept fastbn's layers as torch's.
register_fusers()


def cpu_isa():
    """Instruction set of the CPU kernels in use: ``'avx512bf16'`` (AVX-512 with hardware bfloat16
    rounding; the bfloat16 kernels use it, the others are the AVX-512 ones), ``'avx512'``, ``'avx2'``
    or ``'base'`` (the best this CPU has, capped by the environment variable ``FASTBN_CPU_ISA``)."""
    from . import _C

    return _C.cpu_isa()


def built_with_cuda():
    """Whether this build of fastbn contains its CUDA kernels."""
    from . import _C

    return _C.built_with_cuda()
