"""What the built fastbn._C registers: every op on the CPU and Meta (fake) keys, and on the
CUDA key when the build has its CUDA kernels. FASTBN_EXPECT_CUDA=1 (set by
scripts/ci_cuda_build.sh) makes a build without CUDA kernels a failure instead of a skip."""
import os

import pytest
import torch

import fastbn

OPS = ("forward_train", "forward_eval", "backward_train", "backward_eval", "batch_stats", "merge_stats", "normalize",
       "backward_reduce", "backward_elemt")
# The ops whose autograd is fastbn's own (csrc/autograd.cpp), on every device.
DIFFERENTIABLE = ("forward_train", "forward_eval")
# The ops that are compositions of ATen ops (CompositeImplicitAutograd: no kernel of their own).
COMPOSITE = ("forward_composite",)
EXPECT_CUDA = os.environ.get("FASTBN_EXPECT_CUDA") == "1"


def registered_ops():
    fastbn.ops  # noqa: B018 -- importing fastbn loads _C, which registers the schemas
    return sorted(n[len("fastbn::"):] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbn::"))


def missing_kernels(key):
    return [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbn::{op}", key)]


def test_every_op_is_registered():
    assert registered_ops() == sorted(OPS + COMPOSITE)


def test_composite_ops_decompose():
    for op in COMPOSITE:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbn::{op}", "CompositeImplicitAutograd"), op
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastbn::forward_eval", "CompositeImplicitAutograd")


@pytest.mark.parametrize("key", ["CPU", "Meta"])
def test_every_op_has_a_kernel(key):
    assert missing_kernels(key) == []


def test_forwards_have_their_autograd_kernel():
    for op in DIFFERENTIABLE:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbn::{op}", "Autograd"), op
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastbn::batch_stats", "Autograd")


def test_every_op_has_a_cuda_kernel():
    if not fastbn.built_with_cuda():
        assert not EXPECT_CUDA, "FASTBN_EXPECT_CUDA=1 but fastbn was built without its CUDA kernels"
        pytest.skip("fastbn built without CUDA kernels")
    assert missing_kernels("CUDA") == []


def test_no_cuda_kernel_in_a_cpu_build():
    """The check above can fail: a CPU-only build registers no CUDA kernel at all."""
    if fastbn.built_with_cuda():
        pytest.skip("fastbn built with CUDA kernels")
    assert missing_kernels("CUDA") == list(OPS)
