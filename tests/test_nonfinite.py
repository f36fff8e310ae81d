"""Infinities and NaNs propagate exactly as in torch.nn.BatchNorm: one +inf, -inf or NaN at the
first, a middle or the last position of a channel, in both layouts and every dtype, gives the
same NaN pattern and the same inf pattern (compared separately) in the output, the input,
weight and bias gradients and the running statistics, in training and in evaluation. On a GPU,
where PyTorch's CUDA and CPU kernels disagree (the running mean after an inf in a channel's
first value: NaN on CUDA, inf on the CPU), fastbn gives the CPU's pattern, the plain formulas'."""
import copy

import pytest
import torch

from fastbn.testing import FASTBN, TORCH_BN, acc_dtype, kind_of
from helpers import DEVICES, NONFINITE, assert_same_nonfinite, poisoned_outputs, with_value_at

# Planar shapes with vector-width planes and with odd ones, channels-last rows, BatchNorm1d.
# (2, 3, 64, 64): planar runs of several 16-chunk blocks; (17, 3, 32, 32) channels_last: row
# blocks of more than 16 chunks of periods (both reach the CPU's block-into-state merge).
SHAPES = [(4, 3, 8, 8), (5, 3, 3, 3), (2, 4, 2, 3, 5), (17, 7), (6, 5, 9), (2, 3, 64, 64), (17, 3, 32, 32)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _run(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return {"output": y, "input grad": x.grad, "weight grad": module.weight.grad, "bias grad": module.bias.grad,
            "running_mean": module.running_mean, "running_var": module.running_var}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nonfinite_patterns_match_torch(shape, layout, dtype, device):
    if layout == "channels_last" and len(shape) < 4:
        pytest.skip("channels_last needs 4-D or 5-D input")
    kind = kind_of(len(shape))
    pdt = acc_dtype(dtype)
    for value_name, value in NONFINITE.items():
        for where in ("first", "middle", "last"):
            x = with_value_at(shape, dtype, layout, device, where, value)
            dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
            for training in (True, False):
                ref = TORCH_BN[kind](shape[1], device=device, dtype=pdt)
                with torch.no_grad():
                    ref.weight.uniform_(0.5, 1.5)
                    ref.bias.normal_()
                    ref.running_var.uniform_(0.5, 2.0)
                ours = FASTBN[kind](shape[1], device=device, dtype=pdt)
                ours.load_state_dict(ref.state_dict())
                ref.train(training)
                ours.train(training)
                ref_cpu = copy.deepcopy(ref).cpu() if device != "cpu" else None
                want = _run(ref, x, dy)
                with poisoned_outputs():
                    got = _run(ours, x, dy)
                label = f"{value_name} at the {where} position, {'train' if training else 'eval'}"
                assert torch.isnan(want["output"]).any() or torch.isinf(want["output"]).any(), label
                try:
                    assert_same_nonfinite(got, want, label)
                except AssertionError:
                    if ref_cpu is None:
                        raise
                    # PyTorch's CUDA Welford makes the mean NaN where an inf is the first value a
                    # thread sees (inf - inf in its next update), elsewhere +-inf; its CPU kernels
                    # give the plain formula's +-inf everywhere, as fastbn does on every device.
                    assert_same_nonfinite(got, _run(ref_cpu, x.cpu(), dy.cpu()), label + " (vs PyTorch's CPU)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_values_near_the_float_range(layout, device):
    """float32 values near 1e38, whose sums overflow float: the running statistics are the
    float64 computation's rounded to float32 (finite means; a variance past the float range
    is inf, not NaN). PyTorch's CPU kernels, summing planes in float, give inf means there."""
    gen = torch.Generator().manual_seed(3)
    for scale, offset in ((1e37, 5e37), (3e37, 0.0), (1e18, 0.0)):
        x = (torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) * scale + offset).float()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(device)
        exact, ours = TORCH_BN[2](3, device=device, dtype=torch.float64), FASTBN[2](3, device=device)
        exact(x.double()), ours(x)
        want = {"running_mean": exact.running_mean.float(), "running_var": exact.running_var.float()}
        got = {"running_mean": ours.running_mean, "running_var": ours.running_var}
        label = f"scale {scale:g}, offset {offset:g}"
        assert_same_nonfinite(got, want, label)
        for key in got:
            fin = torch.isfinite(want[key])
            torch.testing.assert_close(got[key][fin], want[key][fin], rtol=1e-5, atol=0, msg=label)
