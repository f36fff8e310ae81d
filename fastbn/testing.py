"""What fastbn's tests, benchmark and scripts share when they compare fastbn with PyTorch:
the accumulation-dtype rule, the BatchNorm kind -> class maps and one tolerance table.

    from fastbn.testing import acc_dtype, TORCH_BN, FASTBN, kind_of, tol, reduction_tol
"""
import torch

from ._ops import acc_dtype
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["acc_dtype", "TORCH_BN", "FASTBN", "kind_of", "TOLERANCES", "tol", "reduction_tol"]

# BatchNorm kind (1, 2, 3 for BatchNorm1d/2d/3d) -> module class.
TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
FASTBN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def kind_of(ndim):
    """The BatchNorm kind that takes input with `ndim` dimensions: (N, C) and (N, C, L) are
    BatchNorm1d, (N, C, H, W) BatchNorm2d, (N, C, D, H, W) BatchNorm3d."""
    return {2: 1, 3: 1, 4: 2, 5: 3}[ndim]


# (rtol, atol) within which two correctly rounded BatchNorm results in an input dtype agree
# (outputs, input gradients, running statistics).
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3e-2),
}


def tol(dtype):
    """``torch.testing.assert_close`` keyword tolerances for results in `dtype`."""
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol)


def reduction_tol(dtype, m):
    """Tolerances for per-channel sums over m values (weight/bias gradients): two correct
    float implementations differ by rounding that grows like sqrt(m)."""
    t = tol(dtype)
    t["atol"] = t["atol"] * max(1.0, (m ** 0.5) / 8)
    return t
