"""The benchmark run: check, then time, every (case, mode) row; then the torch.compile column.

Contracts:
- run_benchmark(cases, ...) returns one row per row started: a dict with exactly COLUMNS
  (TABLE_COLUMNS, the printed ones, plus "bytes" and "note"). status is "ok", "FAIL" (results
  differ from torch eager and from the float64 reference, or the implementation raised: no
  time, the note says what) or "SKIP" (torch eager fails, or the case does not fit in memory).
  Times are ms; speedups are other / fastbn; gbps uses Case.nbytes; pct_copy_bw is relative to
  copy_gbps.
- Pass 1 (check, torch_kernel, fastbn and eager times) covers every row before pass 2 (compile
  times for the "ok" rows the compile policy selects); no row of either pass starts after
  `deadline`, and run-wide remarks go to `notes`. The first failed compilation ends pass 2.
- This module calls time_case and compiled_module through its own globals: tests that replace
  them patch this module.
"""
import itertools
import sys
import time

import torch

from .cases import MODES
from .checking import CaseSkipped, check_case, fastbn_factory, module_pair, reference_module, torch_kernel
from .timing import compiled_module, copy_bandwidth_gbps, time_case

TABLE_COLUMNS = ("case", "dtype", "layout", "mode", "status", "torch_kernel", "fastbn_ms", "eager_ms",
                 "compile_ms", "speedup_eager", "speedup_compile", "gbps", "pct_copy_bw")
COLUMNS = TABLE_COLUMNS + ("bytes", "note")
COMPILE_POLICIES = ("all", "fwdbwd", "fwdbwd-float32", "none")


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
        impl, ref = module_pair(case, mode, impl_factory)
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
            compiled = compiled_module(case, mode, reference_module(case, seed=0).state_dict())
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
