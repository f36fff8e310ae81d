"""The CUDA launch plan (csrc/cuda/plan.h through fastbn._C.cuda_launch_plan, which the CUDA
launchers follow) on the GPU benchmark grid for an H100 (132 SMs): reductions launch at least
two waves, no thread merges more than 32 partial states in a row, ResNet-50's half-precision
shapes take vectorised kernels (7x7 planes through the grouped reductions), and no kernel spills. The register-dependent checks need the
`-Xptxas -v` report of a build: FASTBN_PTXAS_LOG (scripts/ci_cuda_build.sh sets it to its build
log); without it they are skipped (bench.py --plan compiles one instead)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from fastbn_bench import plan  # noqa: E402
from fastbn_bench.cases import RESNET50_CHW  # noqa: E402

from fastbn import _C  # noqa: E402

H100_SMS = 132
LOG = os.environ.get("FASTBN_PTXAS_LOG")
needs_log = pytest.mark.skipif(not LOG, reason="FASTBN_PTXAS_LOG (a build log with -Xptxas -v) not set")
CASES = plan.plan_cases()
REDUCTIONS = ("stats_planar", "stats_cl", "stats_grouped", "grad_reduce_planar", "grad_reduce_cl", "grad_reduce_grouped")
FINALIZES = ("stats_finalize", "grad_finalize")
MIN_PER_BLOCK = 4096  # plan.h kMinPerBlock


@pytest.fixture(scope="module")
def log_text():
    with open(LOG) as f:
        return f.read()


@pytest.fixture(scope="module")
def regs(log_text):
    return plan.registers_from_log(log_text, "sm_90")


def test_grid_is_the_benchmark_grid():
    assert len(CASES) == 3 * (2 * len(RESNET50_CHW) * 2 + 2 * 2 + 3)


@pytest.mark.parametrize("sm_count", [H100_SMS, 108, 1])
def test_merge_chains_at_most_32(sm_count):
    # No registers: splits sized for the most resident blocks, the most partials a channel.
    worst = 0
    for name, shape, dtype, cl in CASES:
        for k in plan.plan(shape, dtype, cl, sm_count):
            assert k["chain"] <= 32, (name, dtype, k)
            worst = max(worst, k["chain"])
            if k["kernel"].startswith(FINALIZES):  # 8 partials a lane, until 256 lanes a channel
                assert k["per_thread"] <= max(8, -(-k["splits"] // 256)), (name, dtype, k)
    assert worst >= 10  # the block trees count


def test_finalize_lanes_follow_the_splits():
    # 256x64x56x56 channels-last half: ~2000 partials a channel, merged by 256 lanes.
    ks = plan.plan((256, 64, 56, 56), "float16", True, H100_SMS)
    fin = [k for k in ks if k["kernel"].startswith("stats_finalize")][0]
    assert fin["splits"] > 1000 and fin["block"] == (256, 1) and fin["grid"] == (64, 1)
    assert fin["chain"] == fin["per_thread"] + 8


def _reduction_limited_by_size(k):
    # A split capped by kMinPerBlock values a block (or one row a thread): the tensor is too
    # small for two waves of full blocks.
    return k["per_thread"] * 256 <= MIN_PER_BLOCK + 256 * 8


@needs_log
def test_reductions_launch_two_waves(regs):
    checked = 0
    for name, shape, dtype, cl in CASES:
        for k in plan.plan(shape, dtype, cl, H100_SMS, regs):
            if not k["kernel"].startswith(REDUCTIONS):
                continue
            assert k["resident"] >= 1, (k["kernel"], "missing from the ptxas report")
            if _reduction_limited_by_size(k):
                continue
            assert k["waves"] >= 2.0, (name, dtype, k)
            checked += 1
    assert checked >= 150  # of 258 reductions; the others' tensors are too small for two waves


def _vectorised(k):
    return k["vec_bytes"] >= 4


def test_resnet50_half_precision_vectorised():
    for n in (32, 256):
        for chw in RESNET50_CHW:
            for dtype in ("float16", "bfloat16"):
                for cl in (False, True):
                    for k in plan.plan((n,) + chw, dtype, cl, H100_SMS):
                        assert _vectorised(k), ((n,) + chw, dtype, cl, k)


def test_7x7_reductions_take_the_grouped_walk():
    for dtype, group in (("float16", 8), ("bfloat16", 8), ("float32", 4)):
        ks = plan.plan((256, 2048, 7, 7), dtype, False, H100_SMS)
        partials = [k for k in ks if k["kernel"].startswith(REDUCTIONS)]
        assert [k["kernel"].split("<")[0] for k in partials] == ["stats_grouped_kernel", "grad_reduce_grouped_kernel"]
        assert all(k["vec_bytes"] == 16 and k["grid"][0] == 2048 // group * k["splits"] for k in partials), partials
    # Channels that do not fill a group (C = 3) keep the one-value planar walk.
    ks = plan.plan((256, 3, 7, 7), "float16", False, H100_SMS)
    assert ks[0]["kernel"] == "stats_planar_kernel<f16, 1>"


@needs_log
def test_no_kernel_spills(log_text):
    assert plan.spills_from_log(log_text) == []


@needs_log
def test_elementwise_kernels_at_most_64_registers(regs):
    elementwise = {k: r for k, r in regs.items() if k.startswith(("normalize_", "grad_input_"))}
    assert len(elementwise) >= 20
    assert {k: r for k, r in elementwise.items() if r > 64} == {}


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        _C.cuda_launch_plan(2, 3, 4, False, "int8", True, 132)
    with pytest.raises(ValueError, match="positive"):
        _C.cuda_launch_plan(0, 3, 4, False, "float", True, 132)
    with pytest.raises(TypeError, match="dict"):
        _C.cuda_launch_plan(2, 3, 4, False, "float", True, 132, [1])
