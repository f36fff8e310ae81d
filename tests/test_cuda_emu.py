"""fastbn's CUDA kernels executed on the CPU by the emulator (tests/cuda_emu), through the
real CUDA backend code, compared with fastbn's CPU kernels.

Every test item named `test_kernel_path[<dtype>-<layout>-<access>]` is one kernel path: all
ten ops, several variants (affine, fused add+relu, relu without affine, half parameters), 2-D
to 5-D inputs, single- and multi-split reductions; each run under the forward schedule with
2 workers, the reverse schedule with 1 worker and a seeded random schedule with 2 workers,
which must agree bitwise (a missing barrier usually shows as a schedule-dependent result).
Outputs and workspaces are poisoned (NaN / 0xFF); every emulator fault fails the test.
`test_every_kernel_launched` then checks that every `*_kernel` the .cu files define ran.

The sanitizer runs: `test_asan_ubsan` reruns these tests on an AddressSanitizer +
UndefinedBehaviorSanitizer build (in a subprocess with libasan preloaded), and
`test_tsan_driver` runs the torch-free driver built with ThreadSanitizer.

Environment: FASTBN_EMU_FLAVOUR=asan selects the sanitizer build (test_asan_ubsan sets it);
FASTBN_EMU_SCHEDULES=1 runs the forward schedule only; FASTBN_EMU_SRC=<dir> builds the
kernels from a copy of csrc/ and FASTBN_EMU_TAG names that build (the seeded-bug test).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from fastbn.testing import acc_dtype

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
import emu_build  # noqa: E402
import emu_harness as H  # noqa: E402
from helpers import NONFINITE, assert_same_nonfinite, with_value_at  # noqa: E402

FLAVOUR = os.environ.get("FASTBN_EMU_FLAVOUR", "plain")
SRC = os.environ.get("FASTBN_EMU_SRC", emu_build.CSRC)
TAG = os.environ.get("FASTBN_EMU_TAG", "")
ALL_SCHEDULES = os.environ.get("FASTBN_EMU_SCHEDULES", "3") != "1"
# (schedule, workers) runs that must agree bitwise; the first is also compared with the CPU.
SCHEDULES = [("forward", 2), ("reverse", 1), ("random", 2)] if ALL_SCHEDULES else [("forward", 2)]
SM = 132  # H100 SXM

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CUDA emulator needs Linux and g++")


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_module(emu_build.build_module(FLAVOUR, src_root=SRC, tag=TAG))


def _fault_checker(emu, what):
    def check(op):
        faults = emu.take_faults()
        assert not faults, f"{what} {op}: emulator faults:\n" + "\n".join(faults)

    return check


def _run_case(emu, case, dtype, seed, schedules=SCHEDULES, sm=SM):
    t = H.make_inputs(case, dtype, seed)
    for variant in H.variants(dtype):
        what = f"{case.id} {dtype} {variant[0]} sm={sm}"
        ref = H.reference_stats(t, case, variant)
        expected = H.run_ops(torch.ops.fastbn, t, case, variant, ref)
        first = None
        for schedule, workers in schedules:
            emu.configure(sm_count=sm, workers=workers, schedule=schedule, seed=seed)
            got = H.run_ops(emu, t, case, variant, ref, _fault_checker(emu, what))
            if first is None:
                H.compare(got, expected, case.count, what)
                first = got
            else:
                H.assert_bitwise_equal(got, first, f"{what}: {schedule} schedule, {workers} workers vs forward")


_done_paths = set()
PATH_IDS = [(d, layout, access) for d in H.DTYPES for (layout, access) in H.PATHS]


@pytest.mark.parametrize("dtype,layout,access", PATH_IDS,
                         ids=[f"{str(d)[6:]}-{layout}-{access}" for d, layout, access in PATH_IDS])
def test_kernel_path(emu, dtype, layout, access):
    for i, case in enumerate(H.PATHS[(layout, access)]):
        _run_case(emu, case, dtype, seed=1000 + i)
    _done_paths.add((dtype, layout, access))


@pytest.mark.parametrize("sm", [114, 7, 1])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=lambda d: str(d)[6:])
def test_sm_counts(emu, sm, dtype):
    """Other split counts: an H100 PCIe (114 SMs), a small GPU (7), one SM."""
    for i, case in enumerate(H.MULTI_SPLIT):
        _run_case(emu, case, dtype, seed=2000 + i, sm=sm)


@pytest.mark.parametrize("dtype", H.DTYPES, ids=lambda d: str(d)[6:])
def test_wide_planar(emu, dtype):
    """C = 4096 planes (4096 reduction blocks): forward and backward with add+relu."""
    case = H.Case((2, 4096, 2, 3))
    t = H.make_inputs(case, dtype, 3000)
    w, b, r, relu = H._args(t, H.variants(dtype)[1])
    emu.configure(sm_count=SM, workers=2, schedule="forward")
    results = []
    for ops in (torch.ops.fastbn, emu):
        with H.poisoned_outputs():
            y, mean, invstd, var = ops.forward_train(t.x, w, b, r, None, None, None, None, H.EPS, relu)
            grads = ops.backward_train(t.dy, t.x, mean, invstd, w, b, r, relu, [True] * 4)
        results.append(dict(zip(["y", "mean", "invstd", "var", "dx", "dw", "db", "dr"], [y, mean, invstd, var, *grads])))
    _fault_checker(emu, case.id)("forward_train/backward_train")
    H.compare(results[1], results[0], case.count, case.id)


def test_many_splits(emu):
    """Over 256 partials a channel (channels-last (N, C), C = 8): the finalize's 256 lanes a
    channel and its shared-memory tree levels."""
    _run_case(emu, H.Case((140000, 8), "channels_last"), torch.float32, seed=3100)


NONFINITE_CASES = [((4, 3, 8, 8), "contiguous"), ((5, 3, 7, 7), "contiguous"), ((3, 8, 7, 7), "contiguous"), ((8, 2, 32, 32), "contiguous"),
                   ((4, 8, 4, 4), "channels_last"), ((3, 5, 3, 3), "channels_last"), ((16, 8, 32, 32), "channels_last"),
                   ((17, 7), "contiguous")]


@pytest.mark.parametrize("dtype", H.DTYPES, ids=lambda d: str(d)[6:])
def test_nonfinite_patterns(emu, dtype):
    """+inf, -inf and NaN at the first, a middle and the last position of a channel (planar
    vector, flat and multi-split paths, channels-last vector and scalar, 2-D): the CUDA kernels
    give exactly the CPU kernels' NaN and inf patterns (the CPU's are PyTorch's:
    tests/test_nonfinite.py) in every output of the training and evaluation ops."""
    emu.configure(sm_count=SM, workers=2, schedule="forward")
    check = _fault_checker(emu, "nonfinite")
    pdt = acc_dtype(dtype)
    for shape, layout in NONFINITE_CASES:
        C = shape[1]
        w, b = torch.rand(C, dtype=pdt) + 0.5, torch.randn(C, dtype=pdt)
        rm, rv = torch.randn(C, dtype=pdt), torch.rand(C, dtype=pdt) + 0.5
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)
        for name, value in NONFINITE.items():
            for where in ("first", "middle", "last"):
                x = with_value_at(shape, dtype, layout, "cpu", where, value)
                dyx = dy.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else dy
                results = []
                for ops in (torch.ops.fastbn, emu):
                    with H.poisoned_outputs():
                        rm2, rv2 = rm.clone(), rv.clone()
                        y, mean, invstd, var = ops.forward_train(x, w, b, None, rm2, rv2, None, 0.1, H.EPS, False)
                        grads = ops.backward_train(dyx, x, mean, invstd, w, b, None, False, [True, True, True, False])
                        ye = ops.forward_eval(x, rm, rv, w, b, None, H.EPS, False)
                        ge = ops.backward_eval(dyx, x, rm, rv, w, b, None, H.EPS, False, [True, True, True, False])
                    results.append({"y": y, "mean": mean, "invstd": invstd, "var": var, "dx": grads[0],
                                    "dw": grads[1], "db": grads[2], "running_mean": rm2, "running_var": rv2,
                                    "eval y": ye, "eval dx": ge[0], "eval dw": ge[1], "eval db": ge[2]})
                check(f"{shape} {layout} {name} {where}")
                assert_same_nonfinite(results[1], results[0], f"{shape} {layout} {dtype} {name} at {where}")


def test_every_kernel_launched(emu):
    """Every `*_kernel` instantiation in the emulator's build of csrc/cuda/*.cu has run."""
    if len(_done_paths) != len(PATH_IDS):
        pytest.skip("runs after the whole test_kernel_path matrix")
    defined = set()
    for obj in emu_build.kernel_objects(FLAVOUR, src_root=SRC):
        syms = subprocess.run(["nm", "-C", "--defined-only", obj], capture_output=True, text=True, check=True).stdout
        defined |= set(re.findall(r"(\w+_kernel<[^()]*>)\(", syms))
    launched = {re.search(r"(\w+_kernel<[^()]*>)$", k).group(1) for k in emu.launch_counts()}
    assert len(defined) >= 72, sorted(defined)
    assert defined - launched == set(), f"never launched: {sorted(defined - launched)}"
    n_launches = sum(emu.launch_counts().values())
    H.REPORT["coverage"] = (f"{len(launched & defined)}/{len(defined)} kernel instantiations launched "
                            f"({n_launches} launches; {len(PATH_IDS)} dtype x layout x access paths)")


@pytest.mark.skipif(FLAVOUR != "plain" or TAG != "", reason="runs from the plain build of csrc/ only")
def test_asan_ubsan():
    """The kernel-path tests again, on a build with AddressSanitizer + UBSan (aborting on the
    first report: out-of-bounds or misaligned accesses, overflows), forward schedule."""
    emu_build.build_module("asan")
    env = emu_build.sanitizer_env("asan")
    env.update(FASTBN_EMU_FLAVOUR="asan", FASTBN_EMU_SCHEDULES="1", PYTHONUNBUFFERED="1")
    r = emu_build.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", __file__,
                       "-k", "test_kernel_path or test_sm_counts"], "asan", env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-20000:]
    assert "AddressSanitizer" not in out and "runtime error" not in out, out[-20000:]
    H.REPORT["asan"] = "AddressSanitizer + UBSan rerun: " + out.strip().splitlines()[-1].strip("= ")


@pytest.mark.skipif(FLAVOUR != "plain" or TAG != "", reason="runs from the plain build of csrc/ only")
def test_tsan_driver():
    """Every launcher on the ThreadSanitizer build (only barriers, __syncwarp and atomics
    order a block's threads there): no data race, results right and schedule-independent."""
    exe = emu_build.build_driver("tsan")
    r = emu_build.run([exe], "tsan")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ThreadSanitizer" not in out, out[-20000:]
    H.REPORT["tsan"] = "ThreadSanitizer driver: " + out.strip().splitlines()[-1].split(": ", 1)[1] + ", no race"
