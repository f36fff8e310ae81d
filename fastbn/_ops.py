"""Loads the native library (registering ``torch.ops.fastbn.*``) and gives every op a fake
(meta) implementation so that ``torch.compile`` and ``torch.export`` can trace through it.

The fake implementations state each op's output contract: outputs shaped like the input
keep the input's layout when it is NCHW-contiguous or channels-last dense (else they are
contiguous); per-channel outputs are 1-D ``[C]`` in the accumulation dtype (float32 for
float16/bfloat16/float32 input, float64 for float64 input).
"""
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


@torch.library.register_fake("fastbn::forward_train")
def _forward_train_fake(input, weight, bias, residual, eps, relu):
    return _like_canonical(input), _per_channel(input), _per_channel(input), _per_channel(input)


@torch.library.register_fake("fastbn::forward_eval")
def _forward_eval_fake(input, running_mean, running_var, weight, bias, residual, eps, relu):
    return _like_canonical(input)


@torch.library.register_fake("fastbn::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum, count):
    return None


def _backward_fake(input, weight, bias, residual, relu, output_mask):
    gi = _like_canonical(input) if output_mask[0] else _unused(input)
    gw = (mask_dtype(_per_channel(input), weight)) if output_mask[1] else _unused(input)
    gb = (mask_dtype(_per_channel(input), bias)) if output_mask[2] else _unused(input)
    gr = _like_canonical(input) if (output_mask[3] and relu and residual is not None) else _unused(input)
    return gi, gw, gb, gr


def mask_dtype(t, param):
    return t if param is None else t.to(param.dtype)


@torch.library.register_fake("fastbn::backward_train")
def _backward_train_fake(grad_out, input, save_mean, save_invstd, weight, bias, residual, relu, output_mask):
    return _backward_fake(input, weight, bias, residual, relu, output_mask)


@torch.library.register_fake("fastbn::backward_eval")
def _backward_eval_fake(grad_out, input, running_mean, running_var, weight, bias, residual, eps, relu, output_mask):
    return _backward_fake(input, weight, bias, residual, relu, output_mask)


@torch.library.register_fake("fastbn::batch_stats")
def _batch_stats_fake(input):
    return _per_channel(input), _per_channel(input)


@torch.library.register_fake("fastbn::merge_stats")
def _merge_stats_fake(counts, means, vars, eps):
    c = means.shape[1]
    return means.new_empty((c,)), means.new_empty((c,)), means.new_empty((c,))


@torch.library.register_fake("fastbn::normalize")
def _normalize_fake(input, mean, invstd, weight, bias, residual, relu):
    return _like_canonical(input)


@torch.library.register_fake("fastbn::backward_reduce")
def _backward_reduce_fake(grad_out, input, mean, invstd, weight, bias, residual, relu):
    return _per_channel(input), _per_channel(input)


@torch.library.register_fake("fastbn::backward_elemt")
def _backward_elemt_fake(grad_out, input, mean, invstd, weight, bias, residual, relu, sum_dy, sum_dy_xhat, count,
                         output_mask):
    gi = _like_canonical(input) if output_mask[0] else _unused(input)
    gr = _like_canonical(input) if (output_mask[1] and relu and residual is not None) else _unused(input)
    return gi, gr
