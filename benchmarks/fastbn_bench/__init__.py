"""fastbn's benchmark against PyTorch BatchNorm (eager and torch.compile), as a package;
benchmarks/bench.py is its command line (see benchmarks/README.md).

Modules, each depending only on those above it:

    cases     Case, the modes, dtypes and layouts, the per-device grids, build_cases, random inputs
    checking  module pairs, the correctness check of one row (check_case) and the torch kernel column
    timing    timers (CPU and CUDA), input rotation past the cache, copy bandwidth, compiled modules
    runner    run_benchmark: check, then time, every row; the row columns and compile policies
    report    summary, text table, run header, the JSON/CSV/PNG files
    cli       argument parsing and main()

The tolerances and the BatchNorm kind -> class maps are fastbn.testing's, shared with the tests
and scripts. Importing this package sets KINETO_LOG_LEVEL (unless set)
so that torch.profiler, run once per row, does not log every start and stop on stderr; Kineto
reads it when torch is first imported, so import this package before torch.
"""
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "6")

from . import cases, checking, cli, report, runner, timing  # noqa: E402

__all__ = ["cases", "checking", "timing", "runner", "report", "cli"]
