"""A few fastbn steps on chosen shapes, as the target of an Nsight Compute run
(scripts/gpu_check.sh profile). Each case: SHAPE:DTYPE:LAYOUT:MODE, e.g.

    python scripts/gpu_profile.py 256x1024x14x14:float16:nchw:fwdbwd 32x64x56x56:float16:channels_last:fwd

SHAPE is N x C x ..., DTYPE float32/float16/bfloat16, LAYOUT nchw/channels_last, MODE fwd (training
forward), fwdbwd (training forward+backward) or eval. Runs --steps steps per case (default 2).
"""
import argparse
import sys

import torch

from fastbn.testing import FASTBN, kind_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT = ["256x1024x14x14:float16:nchw:fwdbwd", "32x64x56x56:float16:channels_last:fwdbwd"]


def run_case(spec, steps):
    shape_s, dtype_s, layout, mode = spec.split(":")
    shape = tuple(int(v) for v in shape_s.split("x"))
    m = FASTBN[kind_of(len(shape))](shape[1], device="cuda").train(mode != "eval")
    x = torch.randn(shape, device="cuda", dtype=DTYPES[dtype_s])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_(mode == "fwdbwd")
    dy = torch.randn_like(x)
    for _ in range(steps):
        if mode == "fwdbwd":
            m(x).backward(dy)
        else:
            with torch.no_grad():
                m(x)
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    for spec in a.cases:
        run_case(spec, a.steps)
        print(f"gpu_profile: {spec} x {a.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
