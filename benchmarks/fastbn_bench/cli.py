"""The command line of benchmarks/bench.py: argument parsing, the compile policy and main().

Contracts:
- main(argv) runs the grid build_cases picks for the parsed filters (--tiny: the tiny group
  only), prints the run header, the table, the notes and the summary on stdout, writes
  <out-dir>/<device>-<YYYY-MM-DD>[-quick][-tiny][-<tag>].json, .csv and .png, and returns the
  exit status: 0, 1 when any row FAILs, 2 when the device is unavailable or no case matches.
- --out-dir defaults to benchmarks/results, whatever the working directory.
- compile_policy_for(args, device) -> (policy, note or None): no-compile flags first, then
  "none" on CUDA without triton, else the flags, else the default (fwdbwd-float32 on the CPU
  or with --quick, "all" otherwise).
- main looks up fastbn_factory, run_benchmark and the helpers below through this module's
  globals: tests that replace them patch this module.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch

import fastbn

from .cases import DTYPE_ALIASES, DTYPES, LAYOUTS, MODES, build_cases
from .checking import fastbn_factory
from .report import device_label, format_summary, format_table, run_header, sanitize, summarize, write_outputs
from .runner import COMPILE_POLICIES, run_benchmark
from .timing import CPU_COPY_BYTES, CUDA_COPY_BYTES, copy_bandwidth_gbps, cpu_seconds, others_cpu_share

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


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
    p.add_argument("--tiny", action="store_true",
                   help="only the tiny group (bn1d-32x32, bn2d-8x16x4x4, bn3d-2x8x2x4x4, float32), whose "
                        "times are the per-call overhead; the default grid includes it")
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
    p.add_argument("--out-dir", default=str(RESULTS_DIR),
                   help="where the .json, .csv and .png go (default: benchmarks/results)")
    p.add_argument("--tag", help="appended to the output file names: <device>-<date>[-quick][-tiny]-<tag>.*")
    p.add_argument("--no-chart", action="store_true", help="do not write the .png chart")
    plan_group = p.add_argument_group("launch plan (no GPU needed)")
    plan_group.add_argument("--plan", action="store_true",
                            help="print the CUDA launch plan of every GPU-grid case (grids, blocks an SM holds, "
                                 "waves, splits, vector bytes, merge chains, bytes a pass) and exit; --shapes, "
                                 "--dtype and --layout filter it")
    plan_group.add_argument("--sm-count", type=int, default=132, help="SMs of the planned device (default 132: H100)")
    plan_group.add_argument("--l2-mb", type=float, default=50, help="L2 size of the planned device in MB (default 50)")
    plan_group.add_argument("--ptxas-log", help="a build log with nvcc's -Xptxas -v report, for the registers "
                                                "(default: compile csrc/cuda/*.cu for sm_90 with nvcc)")
    return p.parse_args(argv)


def run_plan(args):
    """bench.py --plan: prints the launch plan; exit status 0."""
    from . import plan

    cases = [c for c in plan.plan_cases()
             if (not args.dtype or c[2] in args.dtype)
             and (not args.layout or ("channels_last" if c[3] and len(c[1]) > 2 else "nchw") in args.layout
                  or len(c[1]) == 2)
             and (not args.shapes or re.search(args.shapes, c[0]))]
    plan.print_plan(args.sm_count, args.l2_mb, plan.registers(args.ptxas_log), cases)
    return 0


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
    if args.plan:
        return run_plan(args)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda but no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    if device == "cuda" and not fastbn.built_with_cuda():
        print("warning: this build of fastbn has no CUDA kernels: every row will FAIL", file=sys.stderr)
    cases = build_cases(device, args.quick, {"dtypes": args.dtype, "layouts": args.layout, "shapes": args.shapes,
                                             "tiny": args.tiny})
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
          f"cpu_cache={header['fastbn_cpu_cache_mb']:g} MB built_with_cuda={header['fastbn_built_with_cuda']}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (dst.copy_(src) on "
          f"{(CUDA_COPY_BYTES if device == 'cuda' else CPU_COPY_BYTES) >> 20} MB, read + write counted)")
    print(f"{len(cases)} cases x {len(args.modes)} modes, >= {reps} reps per row", flush=True)

    cpu_start = cpu_seconds()
    rows = run_benchmark(cases, modes=args.modes, impl_factory=fastbn_factory, reps=reps, min_time_s=min_time_s,
                         compile_policy=compile_policy, copy_gbps=copy_gbps, notes=notes, deadline=deadline)
    summary = summarize(rows, not_run=len(cases) * len(args.modes) - len(rows))
    others = others_cpu_share(cpu_start, cpu_seconds())
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

    stem = "-".join([device_label(device), header["date"]] + ["quick"] * args.quick + ["tiny"] * args.tiny
                     + ([sanitize(args.tag)] if args.tag else []))
    paths = write_outputs(rows, header, summary, args.out_dir, stem, chart=not args.no_chart)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if summary["fail_count"] else 0
