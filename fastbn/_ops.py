"""Loads the native library (registering ``torch.ops.fastbn.*``) and gives every op a fake
(meta) implementation so that ``torch.compile`` and ``torch.export`` can trace through it.

The fake implementations check their arguments as the kernels' bindings do (csrc/checks.cpp,
csrc/op_impl.h), with the same exception types and messages, so a traced call rejects bad
input at trace time as eager does; shape conditions go through ``torch._check`` so that they
hold for symbolic shapes too.

The fake implementations state each op's output contract: outputs shaped like the input
keep the input's layout when it is NCHW-contiguous or channels-last dense (else they are
contiguous); per-channel outputs are 1-D ``[C]`` in the accumulation dtype (float32 for
float16/bfloat16/float32 input, float64 for float64 input).
"""
import math

import torch

from . import _C  # noqa: F401  (registers the ops)

ops = torch.ops.fastbn


def acc_dtype(dtype):
    """Accumulation dtype of the kernels for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last_dense(t):
    sizes, strides = t.shape, t.stride()
    expected = 1
    if sizes[1] != 1 and strides[1] != expected:
        return False
    expected *= sizes[1]
    for d in range(t.dim() - 1, 1, -1):
        if sizes[d] != 1 and strides[d] != expected:
            return False
        expected *= sizes[d]
    return sizes[0] == 1 or strides[0] == expected


def _like_canonical(t):
    """Empty tensor in the layout the native ops give outputs shaped like ``t``."""
    if t.is_contiguous() or (t.dim() >= 2 and _channels_last_dense(t)):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _per_channel(t, n=None):
    c = t.shape[1] if n is None else n
    return t.new_empty((c,), dtype=acc_dtype(t.dtype))


def _unused(t):
    return t.new_empty((0,))


# at::toString of the dtypes an error message may name.
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble"}
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _name(dtype):
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _num(v):
    """A double as C++'s ostream prints it (``%g``)."""
    return "%g" % v


def _sizes(t):
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_device(t, name, ref, ref_name="input"):
    torch._check(t.device == ref.device, lambda: (
        f"Expected all tensors to be on the same device, but found at least two devices, {ref.device} and "
        f"{t.device}! (fastbn: {name} is on {t.device}, {ref_name} on {ref.device})"))


def _check_input(input):
    torch._check_not_implemented(input.dtype in _SUPPORTED,
                                 lambda: f'"batch_norm" not implemented for \'{_name(input.dtype)}\'')
    torch._check_value(input.dim() >= 2, lambda: (
        f"fastbn: expected input of shape (N, C, ...) with at least 2 dimensions, got {input.dim()}D input"))


def _check_channel_param(t, name, input):
    """weight, bias, statistics: on the input's device, C elements, the input's dtype or its
    accumulation dtype."""
    if t is None:
        return
    C = input.shape[1]
    _check_device(t, name, input)
    torch._check(t.numel() == C, lambda: f"{name} should contain {C} elements not {t.numel()}")
    acc = acc_dtype(input.dtype)
    if not (t.dim() == 1 and t.dtype == acc):
        alt = f" or {_name(acc)}" if acc != input.dtype else ""
        torch._check(t.dtype in (input.dtype, acc), lambda: (
            f"fastbn: expected {name} to have dtype {_name(input.dtype)}{alt} (the input's dtype or its "
            f"accumulation dtype), but got {_name(t.dtype)}"))


def _check_like_input(t, name, input):
    """residual, grad_out: the input's device, shape and dtype."""
    if t is None:
        return
    _check_device(t, name, input)
    torch._check(t.shape == input.shape,
                 lambda: f"fastbn: {name} has shape {_sizes(t)} but input has shape {_sizes(input)}")
    torch._check(t.dtype == input.dtype,
                 lambda: f"fastbn: {name} has dtype {_name(t.dtype)} but input has dtype {_name(input.dtype)}")


def _check_running(running_mean, running_var, num_batches_tracked, momentum, ref, ref_name, C):
    """The running-statistics arguments of forward_train and merge_stats (op_impl.h RunningArgs):
    on the device of `ref` (named `ref_name` in messages), C elements each."""
    device = ref.device
    torch._check_value((running_mean is None) == (running_var is None),
                       lambda: "fastbn: running_mean and running_var must both be given or both be None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        torch._check(t.numel() == C, lambda: f"{name} should contain {C} elements not {t.numel()}")
        _check_device(t, name, ref, ref_name)
        torch._check(t.is_floating_point(), lambda: f"fastbn: {name} must be floating point, got {_name(t.dtype)}")
    if num_batches_tracked is not None:
        t = num_batches_tracked
        torch._check(t.numel() == 1 and t.dtype == torch.int64 and t.device == device, lambda: (
            f"fastbn: num_batches_tracked must be a one-element int64 tensor on {device}, got {_name(t.dtype)} of "
            f"{t.numel()} elements on {t.device}"))
    torch._check_value(running_mean is None or momentum is not None or num_batches_tracked is not None,
                       lambda: "fastbn: momentum=None (cumulative average) needs num_batches_tracked")


def _check_eps(eps, training):
    if training:
        torch._check_value(eps > 0, lambda: f"batch_norm eps must be positive during training, but got {_num(eps)}")
    else:
        torch._check_value(eps >= 0, lambda: f"batch_norm eps must be non-negative, but got {_num(eps)}")


def _check_operands(input, weight, bias, residual):
    _check_channel_param(weight, "weight", input)
    _check_channel_param(bias, "bias", input)
    _check_like_input(residual, "residual", input)


@torch.library.register_fake("fastbn::forward_train")
def _forward_train_fake(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
                        relu):
    _check_input(input)
    _check_running(running_mean, running_var, num_batches_tracked, momentum, input, "input", input.shape[1])
    _check_operands(input, weight, bias, residual)
    _check_eps(eps, True)
    m = math.prod((input.shape[0],) + tuple(input.shape[2:]))
    torch._check_value(m != 1, lambda: (
        f"Expected more than 1 value per channel when training, got input size {_sizes(input)}"))
    return _like_canonical(input), _per_channel(input), _per_channel(input), _per_channel(input)


@torch.library.register_fake("fastbn::forward_eval")
def _forward_eval_fake(input, running_mean, running_var, weight, bias, residual, eps, relu):
    _check_input(input)
    _check_eps(eps, False)
    _check_channel_param(running_mean, "running_mean", input)
    _check_channel_param(running_var, "running_var", input)
    _check_operands(input, weight, bias, residual)
    return _like_canonical(input)


def _backward_fake(input, weight, bias, residual, relu, output_mask):
    gi = _like_canonical(input) if output_mask[0] else _unused(input)
    gw = (mask_dtype(_per_channel(input), weight)) if output_mask[1] else _unused(input)
    gb = (mask_dtype(_per_channel(input), bias)) if output_mask[2] else _unused(input)
    gr = _like_canonical(input) if (output_mask[3] and relu and residual is not None) else _unused(input)
    return gi, gw, gb, gr


def mask_dtype(t, param):
    return t if param is None else t.to(param.dtype)


def _check_backward(grad_out, input, a, b, a_name, b_name, weight, bias, residual):
    _check_input(input)
    _check_operands(input, weight, bias, residual)
    _check_channel_param(a, a_name, input)
    _check_channel_param(b, b_name, input)
    _check_like_input(grad_out, "grad_out", input)


@torch.library.register_fake("fastbn::backward_train")
def _backward_train_fake(grad_out, input, save_mean, save_invstd, weight, bias, residual, relu, output_mask):
    _check_backward(grad_out, input, save_mean, save_invstd, "save_mean", "save_invstd", weight, bias, residual)
    return _backward_fake(input, weight, bias, residual, relu, output_mask)


@torch.library.register_fake("fastbn::backward_eval")
def _backward_eval_fake(grad_out, input, running_mean, running_var, weight, bias, residual, eps, relu, output_mask):
    _check_input(input)
    _check_eps(eps, False)
    _check_channel_param(running_mean, "running_mean", input)
    _check_channel_param(running_var, "running_var", input)
    _check_operands(input, weight, bias, residual)
    _check_like_input(grad_out, "grad_out", input)
    return _backward_fake(input, weight, bias, residual, relu, output_mask)


@torch.library.register_fake("fastbn::batch_stats")
def _batch_stats_fake(input):
    _check_input(input)
    return _per_channel(input), _per_channel(input)


@torch.library.register_fake("fastbn::merge_stats")
def _merge_stats_fake(counts, means, vars, running_mean, running_var, num_batches_tracked, momentum, eps):
    torch._check(means.dim() == 2 and vars.shape == means.shape, lambda: (
        f"fastbn: merge_stats expects means and vars of shape [world, C], got {_sizes(means)} and {_sizes(vars)}"))
    torch._check(counts.numel() == means.shape[0],
                 lambda: f"fastbn: merge_stats expects {means.shape[0]} counts, got {counts.numel()}")
    torch._check(means.dtype in (torch.float32, torch.float64),
                 lambda: "fastbn: merge_stats expects float or double statistics")
    torch._check(vars.dtype == means.dtype, lambda: "fastbn: vars must have the means' dtype")
    for t in (counts, vars):
        torch._check(t.device == means.device, lambda: (
            f"Expected all tensors to be on the same device, but found at least two devices, {means.device} and "
            f"{t.device}!"))
    _check_eps(eps, True)
    c = means.shape[1]
    _check_running(running_mean, running_var, num_batches_tracked, momentum, means, "means", c)
    return (means.new_empty((c,)), means.new_empty((c,)), means.new_empty((c,)),
            means.new_empty((), dtype=torch.int64))


@torch.library.register_fake("fastbn::normalize")
def _normalize_fake(input, mean, invstd, weight, bias, residual, relu):
    _check_backward(None, input, mean, invstd, "mean", "invstd", weight, bias, residual)
    return _like_canonical(input)


@torch.library.register_fake("fastbn::backward_reduce")
def _backward_reduce_fake(grad_out, input, mean, invstd, weight, bias, residual, relu):
    _check_backward(grad_out, input, mean, invstd, "mean", "invstd", weight, bias, residual)
    return _per_channel(input), _per_channel(input)


@torch.library.register_fake("fastbn::backward_elemt")
def _backward_elemt_fake(grad_out, input, mean, invstd, weight, bias, residual, relu, sum_dy, sum_dy_xhat, count,
                         output_mask):
    _check_backward(None, input, mean, invstd, "mean", "invstd", weight, bias, residual)
    _check_channel_param(sum_dy, "sum_dy", input)
    _check_channel_param(sum_dy_xhat, "sum_dy_xhat", input)
    torch._check(count.numel() == 1 and count.device == input.device and not count.is_floating_point()
                 and not count.is_complex(), lambda: (
                     f"fastbn: count must be a one-element integer tensor on {input.device}, got {_name(count.dtype)} "
                     f"of {count.numel()} elements on {count.device}"))
    _check_like_input(grad_out, "grad_out", input)
    gi = _like_canonical(input) if output_mask[0] else _unused(input)
    gr = _like_canonical(input) if (output_mask[1] and relu and residual is not None) else _unused(input)
    return gi, gr
