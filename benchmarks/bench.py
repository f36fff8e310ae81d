#!/usr/bin/env python3
"""fastbn vs PyTorch BatchNorm: correctness-checked timings, side by side, in one run.

For every case (shape x dtype x memory layout) and mode (training forward, training
forward+backward, eval forward) this script first checks fastbn's results against
``torch.nn.BatchNorm*`` eager (same parameters, buffers, input and upstream gradient), records
which PyTorch BatchNorm kernel eager runs there (cudnn, miopen or native), then times fastbn
and torch eager on the same inputs. A second pass then times ``torch.compile``d torch
BatchNorm on the rows the compile policy selects, so that a time budget is spent on the
fastbn and eager columns first. It reports the speedups and fastbn's achieved bandwidth as a
fraction of the device-to-device copy bandwidth measured at the start of the run, and, for a
tiny group of inputs where the kernels take no time to speak of, the per-call overhead. A result
that does not match is reported as FAIL (never as a time) and makes the exit status non-zero.

    python benchmarks/bench.py                      # default grid, on CUDA when available
    python benchmarks/bench.py --device cpu --quick # a handful of small cases
    python benchmarks/bench.py --shapes bn1d --dtype bf16 --modes fwdbwd
    python benchmarks/bench.py --tiny               # only the tiny group: per-call overhead
    python benchmarks/bench.py --budget-s 600       # start no row after 10 minutes; report those run
    python benchmarks/bench.py --compile-policy fwdbwd  # compile column: all|fwdbwd|fwdbwd-float32|none
                                                    # (--compile-all = all, --no-compile = none)

Output: the table and a summary on stdout, and
``<out-dir>/<device>-<YYYY-MM-DD>[-quick][-tiny][-<tag>].json``, ``.csv`` and ``.png``.
See benchmarks/README.md for what each column means.

This file is only the entry point: the code is the package benchmarks/fastbn_bench/ (cases,
checking, timing, runner, report, cli; see its __init__); the tolerances and the BatchNorm
kind -> class maps are fastbn.testing's, shared with the tests.
"""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `python benchmarks/bench.py` has it already; loading this file by path may not
    sys.path.insert(0, _HERE)

from fastbn_bench.cli import main  # noqa: E402  (the package sets KINETO_LOG_LEVEL before importing torch)

if __name__ == "__main__":
    sys.exit(main())
