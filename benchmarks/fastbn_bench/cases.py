"""What the benchmark runs: modes, dtypes, layouts, the per-device case grids and random inputs.

Contracts:
- A Case is one input: BatchNorm kind (1, 2, 3, from fastbn.testing.kind_of), shape (N, C, ...),
  input dtype (a key of DTYPES; parameters and running statistics stay float32, as under
  autocast), memory layout (one of LAYOUTS) and device. Its name is "bn<kind>d-<shape>", e.g.
  "bn2d-8x64x56x56".
- Every grid (each device's default and --quick one) ends its float32 block with the tiny
  group, TINY_SHAPES (one BatchNorm1d, 2d and 3d input small enough that a call's time is the
  per-call host overhead of the module and op dispatch, not the kernel's); tiny shapes run in
  TINY_DTYPES (float32) only, and each shape appears once per (dtype, layout). Case.tiny says
  whether a case's shape is one of them; TINY_NAMES holds their case names.
- build_cases returns the grid in a fixed order (dtype, then shape: the grid's own shapes, then
  the tiny group in TINY_SHAPES order, then layout, nchw first); 2-D (BatchNorm1d) inputs appear
  once, as "nchw". Filters only remove cases: the "tiny" filter keeps the tiny group alone.
- Case.nbytes(mode) is the minimum byte count of one call in `mode` (MODE_PASSES), the basis of
  the GB/s and % copy columns; MODE_TENSORS is one call's activation-sized working set.
- random_tensor(case, seed) is deterministic in (case, seed): N(0.5, 2^2) values in the case's
  shape, dtype and layout, on its device.
"""
import math
import re
from dataclasses import dataclass

import torch

from fastbn.testing import kind_of

MODES = ("fwd", "fwdbwd", "eval")
MODE_TITLES = {"fwd": "training forward", "fwdbwd": "training forward+backward", "eval": "eval forward"}
# Minimum bytes a mode must move, in units of numel * element size: training forward reads x
# twice (statistics, then normalise) and writes y; eval reads x and writes y; forward+backward
# adds reading x and dy twice and writing dx.
MODE_PASSES = {"fwd": 3, "eval": 2, "fwdbwd": 8}
# Distinct activation-sized tensors one call touches (x, y; plus dy, dx for the backward):
# the working set that input rotation keeps out of the cache.
MODE_TENSORS = {"fwd": 2, "eval": 2, "fwdbwd": 4}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32",
                 "fp16": "float16", "f16": "float16", "half": "float16",
                 "bf16": "bfloat16"}
LAYOUTS = ("nchw", "channels_last")

# ResNet-50's BatchNorm2d inputs (C, H, W).
RESNET50_CHW = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
BN1D_SHAPES = [(4096, 512), (256, 4096), (32, 32)]
# The tiny group (BatchNorm1d, 2d, 3d): kernel time negligible, a call's time is its host overhead.
TINY_SHAPES = [(32, 32), (8, 16, 4, 4), (2, 8, 2, 4, 4)]
TINY_DTYPES = ("float32",)
# Per device: (batch sizes for the ResNet-50 shapes, extra 4-D/5-D shapes, dtypes).
GRIDS = {
    "cuda": ((32, 256), [(128, 4, 224, 224), (8, 64, 16, 56, 56)], ("float32", "float16", "bfloat16")),
    "cpu": ((8,), [(8, 4, 224, 224), (2, 64, 8, 28, 28)], ("float32", "bfloat16")),
}
QUICK_GRIDS = {
    "cuda": ([(4, 16, 16, 16), (32, 64, 56, 56), (2, 8, 4, 8, 8), (256, 4096)], ("float32", "float16", "bfloat16")),
    "cpu": ([(4, 16, 16, 16), (2, 8, 4, 8, 8), (64, 32)], ("float32", "bfloat16")),
}


@dataclass(frozen=True)
class Case:
    """One benchmark input: a BatchNorm kind (1, 2, 3 for BatchNorm1d/2d/3d), the input shape
    (N, C, ...), the input dtype (a key of DTYPES; parameters and running statistics stay
    float32, as under autocast), the memory layout and the device."""

    name: str
    kind: int
    shape: tuple
    dtype: str
    layout: str
    device: str

    @property
    def tiny(self):
        """Whether this case is in the tiny group (its shape is in TINY_SHAPES): its time is the
        per-call overhead, and timing.time_case times it over batches of calls."""
        return self.shape in TINY_SHAPES

    @property
    def num_features(self):
        return self.shape[1]

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def reduction_size(self):
        """m: the number of values each channel's statistics are taken over."""
        return self.numel // self.num_features

    @property
    def memory_format(self):
        if self.layout == "nchw":
            return torch.contiguous_format
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d

    def nbytes(self, mode):
        """Minimum bytes `mode` must move through memory for this case."""
        return MODE_PASSES[mode] * self.numel * self.torch_dtype.itemsize


def _case_name(shape):
    return f"bn{kind_of(len(shape))}d-" + "x".join(map(str, shape))


TINY_NAMES = frozenset(_case_name(shape) for shape in TINY_SHAPES)


def _grid_shapes(device, quick, dtype):
    """The shapes the grid runs in `dtype`: the device's own (less the tiny ones), then the tiny
    group when `dtype` is one of TINY_DTYPES."""
    if quick:
        shapes = QUICK_GRIDS[device][0]
    else:
        batches, extra, _ = GRIDS[device]
        shapes = [(n,) + chw for n in batches for chw in RESNET50_CHW] + extra + BN1D_SHAPES
    shapes = [tuple(s) for s in shapes if tuple(s) not in TINY_SHAPES]
    return shapes + (TINY_SHAPES if dtype in TINY_DTYPES else [])


def build_cases(device, quick=False, filters=None):
    """The case grid for `device` ("cuda" or "cpu"), the small --quick grid when `quick`; both
    include the tiny group (TINY_SHAPES, in TINY_DTYPES only).

    `filters` (optional dict): "dtypes" (list of DTYPES keys, replacing the grid's), "layouts" (list of LAYOUTS),
    "shapes" (a regular expression, or plain substring, searched in the case name such as
    "bn2d-8x64x56x56" or "bn1d-4096x512"), "tiny" (true: the tiny group only). 2-D
    (BatchNorm1d) inputs run once, as "nchw".
    """
    filters = filters or {}
    dtypes = filters.get("dtypes") or (QUICK_GRIDS[device] if quick else GRIDS[device])[-1]
    layouts = filters.get("layouts") or LAYOUTS
    pattern = filters.get("shapes")
    cases = []
    for dtype in dtypes:
        for shape in _grid_shapes(device, quick, dtype):
            name = _case_name(shape)
            if (pattern and not _name_matches(pattern, name)) or (filters.get("tiny") and name not in TINY_NAMES):
                continue
            for layout in LAYOUTS:
                if layout in layouts and (layout == "nchw" or len(shape) > 2):
                    cases.append(Case(name, kind_of(len(shape)), shape, dtype, layout, device))
    return cases


def _name_matches(pattern, name):
    try:
        return re.search(pattern, name, re.IGNORECASE) is not None
    except re.error:
        return pattern.lower() in name.lower()


def random_tensor(case, seed, requires_grad=False):
    """Random (N(0.5, 2^2)) input of the case's shape, dtype and memory layout."""
    gen = torch.Generator(device=case.device)
    gen.manual_seed(seed)
    t = torch.randn(case.shape, generator=gen, dtype=case.torch_dtype, device=case.device)
    t = t.mul_(2).add_(0.5).contiguous(memory_format=case.memory_format)
    return t.requires_grad_(requires_grad)
