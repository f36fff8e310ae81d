#!/usr/bin/env python3
"""fastbn vs PyTorch BatchNorm: correctness-checked timings, side by side, in one run.

For every case (shape x dtype x memory layout) and mode (training forward, training
forward+backward, eval forward) this script first checks fastbn's results against
``torch.nn.BatchNorm*`` eager (same parameters, buffers, input and upstream gradient), records
which PyTorch BatchNorm kernel eager runs there (cudnn, miopen or native), then times fastbn
and torch eager on the same inputs. A second pass then times ``torch.compile``d torch
BatchNorm on the rows the compile policy selects, so that a time budget is spent on the
fastbn and eager columns first. It reports the speedups and fastbn's achieved bandwidth as a
fraction of the device-to-device copy bandwidth measured at the start of the run. A result
that does not match is reported as FAIL (never as a time) and makes the exit status non-zero.

    python benchmarks/bench.py                      # default grid, on CUDA when available
    python benchmarks/bench.py --device cpu --quick # a handful of small cases
    python benchmarks/bench.py --shapes bn1d --dtype bf16 --modes fwdbwd
    python benchmarks/bench.py --budget-s 600       # start no row after 10 minutes; report those run
    python benchmarks/bench.py --compile-policy fwdbwd  # compile column: all|fwdbwd|fwdbwd-float32|none
                                                    # (--compile-all = all, --no-compile = none)

Output: the table and a summary on stdout, and
``<out-dir>/<device>-<YYYY-MM-DD>[-quick][-<tag>].json``, ``.csv`` and ``.png``.
See benchmarks/README.md for what each column means.
"""
import argparse
import csv
import datetime
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# torch.profiler (run once per row, see torch_kernel) otherwise logs every profiler start and
# stop on stderr; Kineto reads this setting when torch is imported.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

import fastbn  # noqa: E402

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
# (rtol, atol) for outputs, input gradients and running statistics. Weight/bias gradients are
# sums over m values: their atol is scaled by max(1, sqrt(m) / 8).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}

TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
FASTBN = {1: fastbn.BatchNorm1d, 2: fastbn.BatchNorm2d, 3: fastbn.BatchNorm3d}

# ResNet-50's BatchNorm2d inputs (C, H, W).
RESNET50_CHW = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
BN1D_SHAPES = [(4096, 512), (256, 4096), (32, 32)]
# Per device: (batch sizes for the ResNet-50 shapes, extra 4-D/5-D shapes, dtypes).
GRIDS = {
    "cuda": ((32, 256), [(128, 4, 224, 224), (8, 64, 16, 56, 56)], ("float32", "float16", "bfloat16")),
    "cpu": ((8,), [(8, 4, 224, 224), (2, 64, 8, 28, 28)], ("float32", "bfloat16")),
}
QUICK_GRIDS = {
    "cuda": ([(4, 16, 16, 16), (32, 64, 56, 56), (2, 8, 4, 8, 8), (256, 4096)], ("float32", "float16", "bfloat16")),
    "cpu": ([(4, 16, 16, 16), (2, 8, 4, 8, 8), (64, 32)], ("float32", "bfloat16")),
}
MAX_INPUT_SETS = 16
CPU_COPY_BYTES = 64 << 20
CUDA_COPY_BYTES = 256 << 20
TABLE_COLUMNS = ("case", "dtype", "layout", "mode", "status", "torch_kernel", "fastbn_ms", "eager_ms",
                 "compile_ms", "speedup_eager", "speedup_compile", "gbps", "pct_copy_bw")
COLUMNS = TABLE_COLUMNS + ("bytes", "note")
# The values of the torch_kernel column, in display order.
TORCH_KERNELS = ("cudnn", "miopen", "native")
COMPILE_POLICIES = ("all", "fwdbwd", "fwdbwd-float32", "none")

_COMPILED = {}  # (device, kind, shape, dtype, layout, mode) -> torch.compile'd torch BatchNorm


class CaseSkipped(Exception):
    """The case cannot be compared here: PyTorch itself fails on it."""


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


def fastbn_factory(kind, num_features, **kwargs):
    """Default implementation under test: fastbn.BatchNorm{kind}d(num_features, **kwargs)."""
    return FASTBN[kind](num_features, **kwargs)


def _kind(shape):
    """1, 2 or 3 for BatchNorm1d/2d/3d: (N, C) is BatchNorm1d, (N, C, *k spatial) BatchNorm{k}d."""
    return 1 if len(shape) == 2 else len(shape) - 2


def _case_name(shape):
    return f"bn{_kind(shape)}d-" + "x".join(map(str, shape))


def build_cases(device, quick=False, filters=None):
    """The case grid for `device` ("cuda" or "cpu"), the small --quick grid when `quick`.

    `filters` (optional dict): "dtypes" (list of DTYPES keys, replacing the grid's), "layouts" (list of LAYOUTS),
    "shapes" (a regular expression, or plain substring, searched in the case name such as
    "bn2d-8x64x56x56" or "bn1d-4096x512"). 2-D (BatchNorm1d) inputs run once, as "nchw".
    """
    filters = filters or {}
    if quick:
        shapes, dtypes = QUICK_GRIDS[device]
    else:
        batches, extra, dtypes = GRIDS[device]
        shapes = [(n,) + chw for n in batches for chw in RESNET50_CHW] + extra + BN1D_SHAPES
    dtypes = filters.get("dtypes") or dtypes
    layouts = filters.get("layouts") or LAYOUTS
    pattern = filters.get("shapes")
    cases = []
    for dtype in dtypes:
        for shape in shapes:
            name = _case_name(shape)
            if pattern and not _name_matches(pattern, name):
                continue
            for layout in LAYOUTS:
                if layout in layouts and (layout == "nchw" or len(shape) > 2):
                    cases.append(Case(name, _kind(shape), tuple(shape), dtype, layout, device))
    return cases


def _name_matches(pattern, name):
    try:
        return re.search(pattern, name, re.IGNORECASE) is not None
    except re.error:
        return pattern.lower() in name.lower()


def _random_tensor(case, seed, requires_grad=False):
    """Random (N(0.5, 2^2)) input of the case's shape, dtype and memory layout."""
    gen = torch.Generator(device=case.device)
    gen.manual_seed(seed)
    t = torch.randn(case.shape, generator=gen, dtype=case.torch_dtype, device=case.device)
    t = t.mul_(2).add_(0.5).contiguous(memory_format=case.memory_format)
    return t.requires_grad_(requires_grad)


def _reference_module(case, seed):
    """torch eager BatchNorm with random, non-default parameters and running statistics."""
    c = case.num_features
    m = TORCH_BN[case.kind](c, device=case.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
        m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        m.num_batches_tracked.fill_(3)
    return m


def _module_pair(case, mode, impl_factory, seed=0):
    """(module under test, torch eager reference) holding the same parameters and buffers,
    in train mode unless `mode` is "eval"."""
    ref = _reference_module(case, seed)
    impl = impl_factory(case.kind, case.num_features, device=case.device)
    impl.load_state_dict(ref.state_dict())
    ref.train(mode != "eval")
    impl.train(mode != "eval")
    return impl, ref


def _step(module, mode, x, dy):
    """One call of `module` in `mode`: exactly what gets timed."""
    if mode == "fwdbwd":
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    else:
        with torch.no_grad():
            module(x)


def _run_for_check(module, mode, x, dy):
    x = x.detach().clone().requires_grad_(mode == "fwdbwd")
    if mode == "fwdbwd":
        y = module(x)
        y.backward(dy)
    else:
        with torch.no_grad():
            y = module(x)
    out = {"output": y.detach()}
    if mode == "fwdbwd":
        out.update({"input grad": x.grad, "weight grad": module.weight.grad, "bias grad": module.bias.grad})
    out.update({"running_mean": module.running_mean, "running_var": module.running_var,
                "num_batches_tracked": module.num_batches_tracked})
    return out


def _mismatch(case, actual, expected):
    """None when `actual` matches `expected` (dicts from _run_for_check) within the case's
    tolerances, else a one-line description of the first mismatch."""
    rtol, atol = TOLERANCES[case.torch_dtype]
    reduction_atol = atol * max(1.0, math.sqrt(case.reduction_size) / 8)
    for what, want in expected.items():
        got = actual[what]
        if got is None:
            return f"{what}: missing"
        if what == "num_batches_tracked":
            tol = {"rtol": 0, "atol": 0}
        elif what in ("weight grad", "bias grad"):
            tol = {"rtol": rtol, "atol": reduction_atol}
        else:
            tol = {"rtol": rtol, "atol": atol}
        want = want.to(got.dtype)  # a float64 reference, rounded like the result
        try:
            torch.testing.assert_close(got, want, **tol)
        except AssertionError:
            if got.shape != want.shape:
                return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            got, want = got.double(), want.double()
            bad = ~torch.isclose(got, want, **tol)
            diff = (got - want).abs().nan_to_num(nan=math.inf)
            return (f"{what}: {int(bad.sum())}/{bad.numel()} values differ, max abs diff {diff.max().item():.3g} "
                    f"(allowed: {tol['atol']:.3g} + {tol['rtol']:.3g} * |expected|)")
    return None


def check_case(case, mode, impl_factory=fastbn_factory, seed=0):
    """Compares the implementation built by `impl_factory` with torch eager on one input.

    Checks the output, and for "fwdbwd" the input, weight and bias gradients, plus the
    running statistics after the call. Where they differ beyond the tolerances, a float64
    run of torch BatchNorm on the same data decides: the implementation passes if it
    matches that (torch eager being the inaccurate one, as its CPU channels_last backward
    is in float32), else it fails.

    Returns (passed, note): note describes the mismatch (or the exception the implementation
    raised) in one line, "" when everything matched torch eager. Raises CaseSkipped when
    torch eager itself cannot run the case, torch.OutOfMemoryError when it does not fit.
    """
    impl, ref = _module_pair(case, mode, impl_factory, seed)
    x = _random_tensor(case, seed)
    dy = _random_tensor(case, seed + 1) if mode == "fwdbwd" else None
    try:
        expected = _run_for_check(ref, mode, x, dy)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any PyTorch failure means the case cannot be compared
        raise CaseSkipped(f"torch eager failed: {type(e).__name__}: {_first_line(e)}") from e
    try:
        actual = _run_for_check(impl, mode, x, dy)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - an implementation that raises has no correct result
        return False, f"raised {type(e).__name__}: {_first_line(e)}"
    vs_eager = _mismatch(case, actual, expected)
    if vs_eager is None:
        return True, ""
    exact = TORCH_BN[case.kind](case.num_features, device=case.device, dtype=torch.float64)
    exact.load_state_dict(_reference_module(case, seed).state_dict())
    exact.train(mode != "eval")
    vs_exact = _mismatch(case, actual, _run_for_check(exact, mode, x.double(), dy.double() if dy is not None else None))
    if vs_exact is None:
        return True, f"torch eager is off, fastbn matches the float64 reference; vs eager: {vs_eager}"
    return False, vs_exact


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def torch_kernel(case, mode, seed=0):
    """Which PyTorch BatchNorm implementation torch eager runs for (case, mode): "cudnn",
    "miopen" or "native", from the names of the ops torch.profiler records over one call of
    the reference module (forward, and for "fwdbwd" backward) on the case's input."""
    ref = _reference_module(case, seed)
    ref.train(mode != "eval")
    x = _random_tensor(case, seed, requires_grad=mode == "fwdbwd")
    dy = _random_tensor(case, seed + 1) if mode == "fwdbwd" else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(ref, mode, x, dy)
    names = {e.name for e in prof.events()}
    for kernel in ("cudnn", "miopen"):
        if any(f"{kernel}_batch_norm" in name for name in names):
            return kernel
    return "native"


def _compiled_module(case, mode, state_dict):
    """torch.compile'd torch BatchNorm for (case, mode), cached, loaded with `state_dict`.
    Compilation itself happens on the first call."""
    key = (case.device, case.kind, case.shape, case.dtype, case.layout, mode)
    if key not in _COMPILED:
        module = TORCH_BN[case.kind](case.num_features, device=case.device)
        _COMPILED[key] = torch.compile(module, dynamic=False, fullgraph=True)
    compiled = _COMPILED[key]
    compiled._orig_mod.load_state_dict(state_dict)
    compiled.train(mode != "eval")
    return compiled


def _median_ms_cpu(fns, reps, min_time_s=0.0, warmup=2):
    """Median wall time in ms per call of each function in `fns` (name -> fn).

    Calls are interleaved (one call of each function per round) so that a load change on
    the machine hits all of them alike; at least `reps` rounds, more (up to 10 * reps) until
    `min_time_s` has passed.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - start < min_time_s and rounds < 10 * reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def _median_ms_cuda(fn, reps):
    """Median GPU time in ms of `fn` over at least `reps` calls after warm-up, with CUDA
    events: triton.testing.do_bench when triton is importable, else a per-call event loop."""
    fn()  # lazy initialisation, compilation
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=max(25, 3 * estimate_ms), rep=max(100, 1.2 * reps * estimate_ms),
                              return_mode="median"))
    for _ in range(min(1000, int(25 / estimate_ms) + 1)):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cache_bytes(device):
    """Size of the cache input rotation must defeat: the GPU's L2 (50 MB if unknown), or the
    CPU's last-level cache from sysfs (32 MB if unknown)."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 50 << 20
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text.rstrip("KMG")) * units.get(text[-1], 1)
    return 32 << 20


def time_case(case, mode, modules, reps, min_time_s=0.0):
    """Median time in ms per call of each module (name -> module) in `mode`, on the same inputs.

    When one call's working set is smaller than twice the cache (GPU L2, CPU last level),
    calls rotate over several input sets (up to MAX_INPUT_SETS) whose total exceeds it, so
    the inputs are not cache-resident at the start of a call. Returns (times, errors): a
    module whose warm-up raises gets no time and an error message instead.
    """
    working_set = MODE_TENSORS[mode] * case.numel * case.torch_dtype.itemsize
    n_sets = max(1, min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes(case.device) / working_set)))
    grad = mode == "fwdbwd"
    inputs = [(_random_tensor(case, 100 + i, requires_grad=grad), _random_tensor(case, 200 + i) if grad else None)
              for i in range(n_sets)]
    fns, errors = {}, {}
    for name, module in modules.items():
        sets = itertools.cycle(inputs)

        def fn(module=module, sets=sets):
            _step(module, mode, *next(sets))

        try:
            fn()  # first call: compilation for torch.compile
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in the row, the others still get timed
            errors[name] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        fns[name] = fn
    if case.device == "cuda":
        times = {name: _median_ms_cuda(fn, reps) for name, fn in fns.items()}
    else:
        times = _median_ms_cpu(fns, reps, min_time_s)
    return times, errors


def copy_bandwidth_gbps(device, reps=20):
    """Device-to-device copy bandwidth in GB/s (1e9 bytes): 2 x bytes (read + write) over the
    median time of dst.copy_(src) on a 256 MB (GPU) or 64 MB (CPU) buffer."""
    nbytes = CUDA_COPY_BYTES if device == "cuda" else CPU_COPY_BYTES
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def fn():
        dst.copy_(src)

    ms = _median_ms_cuda(fn, reps) if device == "cuda" else _median_ms_cpu({"copy": fn}, reps)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _new_row(case, mode):
    row = dict.fromkeys(COLUMNS)
    row.update(case=case.name, dtype=case.dtype, layout=case.layout, mode=mode, status="ok",
               bytes=case.nbytes(mode), note="")
    return row


def _wants_compile(policy, case, mode):
    """Whether compile policy `policy` (one of COMPILE_POLICIES) gives (case, mode) a compile column."""
    if policy == "all":
        return True
    if mode != "fwdbwd":
        return False
    return policy == "fwdbwd" or (policy == "fwdbwd-float32" and case.dtype == "float32")


def _past(deadline):
    return deadline is not None and time.monotonic() >= deadline


def run_benchmark(cases, modes=MODES, impl_factory=fastbn_factory, reps=10, min_time_s=0.0,
                  compile_policy="all", copy_gbps=None, progress=True, notes=None, deadline=None):
    """Checks, then times, every (case, mode); returns one row (dict with COLUMNS) for each
    row started.

    impl_factory(kind, num_features, **kwargs) builds the module under test (the "fastbn"
    columns); kwargs holds `device`. compile_policy: which rows get the compile column, one of
    COMPILE_POLICIES: "all", "fwdbwd" (training forward+backward rows only), "fwdbwd-float32"
    (those in float32 only) or "none". copy_gbps: the copy bandwidth the pct_copy_bw column
    refers to (measured here when None). Run-wide remarks (such as torch.compile being
    unavailable, or rows left out for the deadline) are appended to the list `notes` when one
    is given.

    The first pass checks each row, records torch_kernel (see torch_kernel) and times fastbn
    and torch eager side by side. The second pass times torch.compile on the rows the policy
    selects that the first pass timed. When the first compilation fails, no further row gets
    a compile time. deadline: a time.monotonic() value or None; no row of either pass starts
    after it: the first pass's rows not started are left out of the result, the second
    pass's keep no compile time.

    Row status: "ok"; "FAIL" when the implementation's results do not match torch eager (nor,
    where eager itself is off, a float64 reference; see check_case), or it raises: the note
    says what differs and no time is reported; "SKIP" when the case cannot run here (torch
    eager fails, or it does not fit in memory).
    """
    from tqdm import tqdm

    notes = [] if notes is None else notes
    if not cases:
        return []
    device = cases[0].device
    if copy_gbps is None:
        copy_gbps = copy_bandwidth_gbps(device)
    if compile_policy != "none":
        from torch._dynamo import config as dynamo_config
        from torch._inductor import config as inductor_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4096)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 65536)
        if device == "cpu":
            # Compile in this process: a pool of compile workers warming up in the background
            # would steal the cores from the timings that follow.
            inductor_config.compile_threads = 1
    rows = []
    to_compile = []  # (case, mode, row) of the timed rows the policy gives a compile column
    total = len(cases) * len(modes)
    bar = tqdm(total=total, file=sys.stderr, disable=not progress, unit="row", dynamic_ncols=True)
    for case, mode in itertools.product(cases, modes):
        if _past(deadline):
            notes.append(f"stopped at the time budget (--budget-s): {total - len(rows)} of {total} rows not run")
            break
        bar.set_description(f"{case.name} {case.dtype} {case.layout} {mode}")
        row = _new_row(case, mode)
        rows.append(row)
        try:
            _time_row(row, case, mode, impl_factory, reps, min_time_s, copy_gbps)
        finally:
            bar.update()
        if row["status"] == "ok" and _wants_compile(compile_policy, case, mode):
            to_compile.append((case, mode, row))
        if device == "cuda" and mode == modes[-1]:
            torch.cuda.empty_cache()
    bar.close()
    _compile_pass(to_compile, reps, min_time_s, notes, deadline, progress)
    return rows


def _time_row(row, case, mode, impl_factory, reps, min_time_s, copy_gbps):
    """First pass of one row: fills `row` with the check's outcome, torch_kernel and the
    fastbn and eager times (see run_benchmark)."""
    try:
        passed, row["note"] = check_case(case, mode, impl_factory)
        if not passed:
            row["status"] = "FAIL"
            return
        row["torch_kernel"] = torch_kernel(case, mode)
        impl, ref = _module_pair(case, mode, impl_factory)
        times, errors = time_case(case, mode, {"fastbn": impl, "eager": ref}, reps, min_time_s)
    except CaseSkipped as e:
        row.update(status="SKIP", note=str(e))
        return
    except torch.OutOfMemoryError:
        row.update(status="SKIP", note="does not fit in device memory")
        return
    if "fastbn" in errors:
        row.update(status="FAIL", note=f"raised while timing: {errors['fastbn']}")
        return
    if "eager" in errors:
        row.update(status="SKIP", note=f"torch eager failed while timing: {errors['eager']}")
        return
    fast = times["fastbn"]
    row.update(fastbn_ms=fast, eager_ms=times["eager"], speedup_eager=times["eager"] / fast,
               gbps=row["bytes"] / (fast * 1e-3) / 1e9)
    row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps


def _append_note(row, text):
    row["note"] = "; ".join(filter(None, [row["note"], text]))


def _compile_pass(to_compile, reps, min_time_s, notes, deadline, progress):
    """Second pass (see run_benchmark): fills compile_ms and speedup_compile of each row in
    `to_compile` ((case, mode, row) with the first pass's fastbn_ms), appending run-wide
    remarks to `notes`."""
    from tqdm import tqdm

    compile_ok = False  # at least one compilation has worked in this run
    bar = tqdm(total=len(to_compile), file=sys.stderr, disable=not progress or not to_compile, unit="row",
               dynamic_ncols=True)
    for i, (case, mode, row) in enumerate(to_compile):
        if _past(deadline):
            notes.append(f"torch.compile column missing from {len(to_compile) - i} of {len(to_compile)} rows "
                         f"that want it: the time budget (--budget-s) ran out")
            break
        bar.set_description(f"torch.compile {case.name} {case.dtype} {case.layout} {mode}")
        try:
            compiled = _compiled_module(case, mode, _reference_module(case, seed=0).state_dict())
            times, errors = time_case(case, mode, {"compile": compiled}, reps, min_time_s)
        except torch.OutOfMemoryError:
            _append_note(row, "torch.compile: does not fit in device memory")
            continue
        finally:
            bar.update()
            if case.device == "cuda":
                torch.cuda.empty_cache()
        if "compile" in errors:
            _append_note(row, f"torch.compile failed: {errors['compile']}")
            if not compile_ok:
                notes.append(f"torch.compile column skipped: compiling failed ({errors['compile']})")
                break
            continue
        compile_ok = True
        row.update(compile_ms=times["compile"], speedup_compile=times["compile"] / row["fastbn_ms"])
    bar.close()


def _geomean(values):
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def summarize(rows, not_run=0):
    """Per mode: geometric-mean speedup of fastbn vs eager and vs compile over the timed rows,
    the speedup vs eager split by the kernel torch eager ran ("by_torch_kernel": kernel ->
    {"geomean_speedup_eager", "rows"}, kernels in TORCH_KERNELS order) and the slowest row
    (lowest speedup vs eager); plus the FAIL and SKIP counts, the number of rows and
    `not_run`, the number of rows the time budget left out."""
    summary = {"modes": {}, "fail_count": sum(r["status"] == "FAIL" for r in rows),
               "skip_count": sum(r["status"] == "SKIP" for r in rows), "rows": len(rows), "not_run": not_run}
    for mode in MODES:
        timed = [r for r in rows if r["mode"] == mode and r["speedup_eager"] is not None]
        if not timed:
            continue
        vs_compile = [r["speedup_compile"] for r in timed if r["speedup_compile"] is not None]
        by_kernel = {}
        for kernel in TORCH_KERNELS:
            speedups = [r["speedup_eager"] for r in timed if r["torch_kernel"] == kernel]
            if speedups:
                by_kernel[kernel] = {"geomean_speedup_eager": _geomean(speedups), "rows": len(speedups)}
        slowest = min(timed, key=lambda r: r["speedup_eager"])
        summary["modes"][mode] = {
            "timed_rows": len(timed),
            "geomean_speedup_eager": _geomean([r["speedup_eager"] for r in timed]),
            "geomean_speedup_compile": _geomean(vs_compile),
            "compile_rows": len(vs_compile),
            "by_torch_kernel": by_kernel,
            "slowest": {k: slowest[k] for k in ("case", "dtype", "layout", "speedup_eager")},
        }
    return summary


def format_summary(summary):
    """The summary as printable lines."""
    lines = []
    for mode, s in summary["modes"].items():
        slow = s["slowest"]
        line = (f"{MODE_TITLES[mode]:>26}: fastbn vs eager {s['geomean_speedup_eager']:.2f}x geomean "
                f"over {s['timed_rows']} rows")
        if s["geomean_speedup_compile"] is not None:
            line += f", vs compile {s['geomean_speedup_compile']:.2f}x over {s['compile_rows']}"
        if s["by_torch_kernel"]:
            line += "; " + ", ".join(f"vs {kernel} rows {k['geomean_speedup_eager']:.2f}x (n={k['rows']})"
                                     for kernel, k in s["by_torch_kernel"].items())
        line += f"; slowest: {slow['case']} {slow['dtype']} {slow['layout']} {slow['speedup_eager']:.2f}x"
        lines.append(line)
    last = f"FAIL rows: {summary['fail_count']}   SKIP rows: {summary['skip_count']}   rows: {summary['rows']}"
    if summary["not_run"]:
        last += f"   not run (time budget): {summary['not_run']}"
    lines.append(last)
    return lines


def _fmt(column, value):
    if value is None:
        return "-"
    if column.endswith("_ms"):
        return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"
    if column.startswith("speedup"):
        return f"{value:.2f}x"
    if column == "gbps":
        return f"{value:.1f}"
    if column == "pct_copy_bw":
        return f"{value:.0f}%"
    return str(value)


def format_table(rows):
    """The rows as an aligned text table (text columns left-, numbers right-aligned)."""
    titles = {"torch_kernel": "torch kernel", "fastbn_ms": "fastbn ms", "eager_ms": "eager ms",
              "compile_ms": "compile ms", "speedup_eager": "vs eager", "speedup_compile": "vs compile",
              "gbps": "GB/s", "pct_copy_bw": "% copy"}
    header = [titles.get(c, c) for c in TABLE_COLUMNS]
    body = [[_fmt(c, r[c]) for c in TABLE_COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    left = {"case", "dtype", "layout", "mode", "status", "torch_kernel"}

    def line(cells):
        return "  ".join(cell.ljust(w) if c in left else cell.rjust(w)
                         for c, cell, w in zip(TABLE_COLUMNS, cells, widths))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    return "\n".join(out)


def _cpu_model():
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sanitize(name):
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def device_label(device):
    """File-name-safe device name: the GPU's name, or "cpu-<model>-<threads>t"."""
    if device == "cuda":
        return _sanitize(torch.cuda.get_device_name())
    return f"cpu-{_sanitize(_cpu_model())}-{torch.get_num_threads()}t"


def run_header(device, copy_gbps, argv):
    """The header block stored with the results: versions, device, copy bandwidth, command."""
    header = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(),
        "fastbn_cpu_isa": fastbn.cpu_isa(),
        "fastbn_built_with_cuda": fastbn.built_with_cuda(),
        "copy_gbps": copy_gbps,
        "command": shlex.join(["benchmarks/bench.py"] + list(argv)),
    }
    return header


def _write_chart(rows, path, title):
    """Horizontal bars of fastbn's speedup per row for the training forward+backward mode (or
    the first mode that was timed), on a log scale from the line at 1.0: vs eager, and vs
    compile where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    timed = [r for r in rows if r["speedup_eager"] is not None]
    mode = "fwdbwd" if any(r["mode"] == "fwdbwd" for r in timed) else timed[0]["mode"]
    data = [r for r in timed if r["mode"] == mode]
    with_compile = any(r["speedup_compile"] is not None for r in data)
    height = 0.4 if with_compile else 0.7
    series = [("speedup_eager", "vs torch eager", -height / 2 if with_compile else 0.0)]
    if with_compile:
        series.append(("speedup_compile", "vs torch.compile", height / 2))
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.3 * len(data)))
    values = []
    for column, label, offset in series:
        points = [(y + offset, r[column]) for y, r in enumerate(data) if r[column] is not None]
        values += [s for _, s in points]
        colors = [("tab:green" if s >= 1 else "tab:red") if column == "speedup_eager" else "tab:blue"
                  for _, s in points]
        ax.barh([y for y, _ in points], [s - 1 for _, s in points], left=1, height=height, color=colors,
                alpha=1.0 if column == "speedup_eager" else 0.5, label=label)
        for y, s in points:
            ax.text(s, y, f" {s:.2f}x ", va="center",
                    ha="left" if s >= 1 else "right", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(values + [1]) / 1.6, max(values + [1]) * 1.6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_yticks(range(len(data)), [f"{r['case']} {r['dtype']} {r['layout']}" for r in data], fontsize=8)
    ax.set_ylim(len(data) - 0.5, -0.5)
    ax.set_xlabel(f"fastbn speedup, {MODE_TITLES[mode]} (log scale; right of 1x: fastbn faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows, header, summary, out_dir, stem, chart=True):
    """Writes <out_dir>/<stem>.json (header, summary, rows), .csv (the header as "# key: value"
    comment lines, then one line per row) and, when `chart` and some row was timed, the .png
    chart. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv"]
    paths[0].write_text(json.dumps({"header": header, "summary": summary, "rows": rows}, indent=1) + "\n")
    with open(paths[1], "w", newline="") as f:
        for key, value in header.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if chart and any(r["speedup_eager"] is not None for r in rows):
        paths.append(out_dir / f"{stem}.png")
        where = header["device_name"] + (f" ({header['threads']} threads)" if header["device"] == "cpu" else "")
        _write_chart(rows, paths[-1], f"fastbn vs PyTorch on {where}, torch {header['torch']}, {header['date']}")
    return paths


def _comma_list(text, allowed, aliases=None, what="value"):
    items = [(aliases or {}).get(t.strip().lower(), t.strip().lower()) for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="fastbn vs torch.nn.BatchNorm (eager and torch.compile): "
                                            "correctness-checked timings.")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", type=lambda s: _comma_list(s, tuple(DTYPES), DTYPE_ALIASES, "dtype"),
                   help="comma list of float32, float16, bfloat16 (fp32, fp16, bf16); default: the device's grid")
    p.add_argument("--layout", type=lambda s: _comma_list(s, LAYOUTS, {"cl": "channels_last"}, "layout"),
                   help="comma list of nchw, channels_last; default: both")
    p.add_argument("--shapes", help='regular expression (or substring) matched against the case name, '
                                    'e.g. "64x56x56", "bn1d", "bn2d-256x"')
    p.add_argument("--modes", type=lambda s: _comma_list(s, MODES, what="mode"), default=list(MODES),
                   help="comma list of fwd (training forward), fwdbwd (training forward+backward), "
                        "eval (eval forward); default: all")
    p.add_argument("--quick", action="store_true", help="a handful of small cases, few repetitions")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile-policy", choices=COMPILE_POLICIES,
                               help="which rows get the torch.compile column: all, fwdbwd (training "
                                    "forward+backward rows), fwdbwd-float32 (those in float32), none; "
                                    "default: fwdbwd-float32 on CPU or with --quick, else all")
    compile_group.add_argument("--no-compile", action="store_true", help="same as --compile-policy none")
    compile_group.add_argument("--compile-all", action="store_true", help="same as --compile-policy all")
    p.add_argument("--budget-s", type=float, metavar="SECONDS",
                   help="start no row (of the fastbn/eager pass, then of the torch.compile pass) after this "
                        "many seconds from the start of the run; the rows run are reported and written "
                        "(default: no limit)")
    p.add_argument("--reps", type=int, help="minimum timed repetitions per row (default: 50 on CUDA, "
                                            "10 on CPU; 20 / 10 with --quick)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"),
                   help="where the .json, .csv and .png go (default: benchmarks/results)")
    p.add_argument("--tag", help="appended to the output file names: <device>-<date>[-quick]-<tag>.*")
    p.add_argument("--no-chart", action="store_true", help="do not write the .png chart")
    return p.parse_args(argv)


def _cpu_seconds():
    """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process and its
    children), or None where /proc/stat is not available."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def _others_cpu_share(start, end):
    """Fraction of the machine's CPU time that other processes used between two _cpu_seconds()."""
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def _has_triton():
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def compile_policy_for(args, device):
    """(compile policy, run-wide note or None) for the parsed command line on `device`."""
    if args.no_compile or args.compile_policy == "none":
        flag = "--no-compile" if args.no_compile else "--compile-policy none"
        return "none", f"torch.compile column skipped ({flag})"
    if device == "cuda" and not _has_triton():
        return "none", "torch.compile column skipped: triton is not installed"
    if args.compile_all:
        return "all", None
    if args.compile_policy == "fwdbwd":
        return "fwdbwd", "torch.compile column only for fwdbwd rows (--compile-policy fwdbwd)"
    if args.compile_policy == "fwdbwd-float32":
        return "fwdbwd-float32", "torch.compile column only for fwdbwd float32 rows (--compile-policy fwdbwd-float32)"
    if args.compile_policy is None and (device == "cpu" or args.quick):
        return "fwdbwd-float32", ("torch.compile column only for fwdbwd float32 rows "
                                  f"({'--quick' if args.quick else 'CPU'} default; --compile-policy all "
                                  "for every row)")
    return "all", None


def main(argv=None):
    """Command-line entry point; returns the exit status (1 when any row FAILs)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda but no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    if device == "cuda" and not fastbn.built_with_cuda():
        print("warning: this build of fastbn has no CUDA kernels: every row will FAIL", file=sys.stderr)
    cases = build_cases(device, args.quick, {"dtypes": args.dtype, "layouts": args.layout, "shapes": args.shapes})
    if not cases:
        print("bench.py: no case matches the filters", file=sys.stderr)
        return 2
    default_reps = 10 if device == "cpu" else 20 if args.quick else 50
    reps = args.reps or default_reps
    min_time_s = 0.0 if args.quick or device == "cuda" else 0.2

    notes = []
    compile_policy, note = compile_policy_for(args, device)
    if note:
        notes.append(note)

    copy_gbps = copy_bandwidth_gbps(device)
    header = run_header(device, copy_gbps, argv)
    print(f"fastbn benchmark on {header['device_name']} ({device}, {header['threads']} threads), "
          f"torch {header['torch']}, fastbn cpu_isa={header['fastbn_cpu_isa']} "
          f"built_with_cuda={header['fastbn_built_with_cuda']}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (dst.copy_(src) on "
          f"{(CUDA_COPY_BYTES if device == 'cuda' else CPU_COPY_BYTES) >> 20} MB, read + write counted)")
    print(f"{len(cases)} cases x {len(args.modes)} modes, >= {reps} reps per row", flush=True)

    cpu_start = _cpu_seconds()
    rows = run_benchmark(cases, modes=args.modes, impl_factory=fastbn_factory, reps=reps, min_time_s=min_time_s,
                         compile_policy=compile_policy, copy_gbps=copy_gbps, notes=notes, deadline=deadline)
    summary = summarize(rows, not_run=len(cases) * len(args.modes) - len(rows))
    others = _others_cpu_share(cpu_start, _cpu_seconds())
    if others is not None and others > 0.1 and device == "cpu":
        notes.append(f"other processes used {100 * others:.0f}% of this machine's CPU time during the run: "
                     f"the CPU timings are disturbed; re-run when the machine is idle")
    header.update(compile=compile_policy, reps=reps, budget_s=args.budget_s, other_processes_cpu_share=others,
                  notes=notes)

    print()
    print(format_table(rows))
    row_notes = [f"  {r['status']:4} {r['case']} {r['dtype']} {r['layout']} {r['mode']}: {r['note']}"
                 for r in rows if r["note"]]
    if notes or row_notes:
        print("\nnotes:")
        print("\n".join([f"  {n}" for n in notes] + row_notes))
    print()
    print("\n".join(format_summary(summary)))

    stem = "-".join([device_label(device), header["date"]] + ["quick"] * args.quick
                     + ([_sanitize(args.tag)] if args.tag else []))
    paths = write_outputs(rows, header, summary, args.out_dir, stem, chart=not args.no_chart)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if summary["fail_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
