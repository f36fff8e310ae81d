"""The CUDA launch plan of the GPU grid, readable without a GPU (`bench.py --plan`).

Contracts:
- plan_cases() is the GPU grid's cases as (name, shape, dtype name, channels_last): every shape
  of GRIDS["cuda"] in every dtype, NCHW and channels_last (2-D shapes once).
- registers(ptxas_log=None, arch="sm_90") maps each kernel instantiation's name, as
  scripts/ptxas_report.py prints it ("stats_cl_kernel<f16, 8>"), to its registers for `arch`:
  from a build log holding nvcc's `-Xptxas -v` report, else by compiling csrc/cuda/*.cu with
  nvcc (None when nvcc is not found).
- plan(shape, dtype, channels_last, sm_count, registers) is fastbn._C.cuda_launch_plan for one
  input (every tensor 16-byte aligned): one dict per kernel launch of a training step, as
  csrc/plan_binding.cpp describes them.
- print_plan(...) prints one line per launch of every case.
"""
import concurrent.futures
import glob
import importlib.util
import math
import os
import shutil
import subprocess
import tempfile

from fastbn import _C

from .cases import BN1D_SHAPES, DTYPES, GRIDS, RESNET50_CHW

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# fastbn's storage type names (csrc/bn_types.h) of the benchmark's dtypes.
KERNEL_TYPES = {"float32": "float", "float16": "f16", "bfloat16": "bf16", "float64": "double"}


def plan_cases():
    batches, extra, dtypes = GRIDS["cuda"]
    shapes = [(n,) + chw for n in batches for chw in RESNET50_CHW] + list(extra) + list(BN1D_SHAPES)
    out = []
    for dtype in dtypes:
        for shape in shapes:
            for cl in (False, True):
                if len(shape) == 2 and cl:
                    continue  # (N, C) is rows of C: one layout
                name = f"bn{max(len(shape) - 2, 1)}d-" + "x".join(map(str, shape)) + ("-cl" if cl else "")
                out.append((name, shape, dtype, cl or len(shape) == 2))
    return out


def _ptxas_report_module():
    spec = importlib.util.spec_from_file_location("ptxas_report", os.path.join(ROOT, "scripts", "ptxas_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(text):
    """[(kernel name, arch, resources)] of a `-Xptxas -v` report (scripts/ptxas_report.py's parse)."""
    rep = _ptxas_report_module()
    parsed = rep.parse(text.splitlines())
    names = rep.demangle(list(dict.fromkeys(k for k, _ in parsed)))
    return [(names[k], a, r) for (k, a), r in parsed.items()]


def registers_from_log(text, arch="sm_90"):
    """{kernel name: registers} of `arch` from a log holding a `-Xptxas -v` report."""
    return {name: r["regs"] for name, a, r in _report(text) if a == arch and "regs" in r}


def spills_from_log(text):
    """[(kernel name, arch)] of the kernels whose ptxas report shows spill stores or loads."""
    spills = _ptxas_report_module().spills
    return sorted((name, a) for name, a, r in _report(text) if spills(r))


def compile_report(arch="sm_90"):
    """The `-Xptxas -v` output of nvcc on every csrc/cuda/*.cu for `arch`, or None without nvcc."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        return None
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    with tempfile.TemporaryDirectory() as tmp:
        def one(f):
            cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"),
                   f, "-o", os.path.join(tmp, os.path.basename(f) + ".o")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {f}:\n{res.stderr[-2000:]}")
            return res.stdout + res.stderr

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            return "\n".join(pool.map(one, files))


def registers(ptxas_log=None, arch="sm_90"):
    if ptxas_log:
        with open(ptxas_log) as f:
            return registers_from_log(f.read(), arch)
    text = compile_report(arch)
    return None if text is None else registers_from_log(text, arch)


def plan(shape, dtype, channels_last, sm_count=132, regs=None):
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:]) if len(shape) > 2 else 1
    return _C.cuda_launch_plan(n, c, s, channels_last, KERNEL_TYPES[dtype], True, sm_count, regs)


def print_plan(sm_count=132, l2_mb=50, regs=None, cases=None):
    """One line per kernel launch of each case's training step (forward, then backward)."""
    print(f"CUDA launch plan: {sm_count} SMs, {l2_mb} MB L2; registers "
          f"{'from the ptxas report' if regs else 'unknown (splits sized for the most resident blocks)'}")
    print("resident: blocks an SM holds (from the registers); chain: longest serial merge chain a thread; "
          "per_thread: values a thread loads")
    for name, shape, dtype, cl in cases or plan_cases():
        elem = DTYPES[dtype].itemsize
        mb = math.prod(shape) * elem / 2**20
        fits = "fits L2" if mb <= l2_mb else "exceeds L2"
        print(f"\n{name} {dtype} ({mb:.1f} MB, {fits})")
        for k in plan(shape, dtype, cl, sm_count, regs):
            waves = f"{k['waves']:.2f}" if k["resident"] else "?"
            print(f"  {k['pass']:8s} {k['kernel']:34s} grid {k['grid'][0]:>5}x{k['grid'][1]:<5} "
                  f"block {k['block'][0]:>3}x{k['block'][1]:<3} resident {k['resident'] or '?':>2} waves {waves:>5} "
                  f"splits {k['splits']:>5} vec {k['vec_bytes']:>2} B per_thread {k['per_thread']:>6} "
                  f"chain {k['chain']:>3} read {k['bytes_read'] / 2**20:8.2f} MB write {k['bytes_written'] / 2**20:8.2f} MB")
