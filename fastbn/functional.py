"""``fastbn.functional.batch_norm``: ``torch.nn.functional.batch_norm`` on fastbn's kernels."""
import torch

from ._ops import ops

_ACTIVATIONS = (None, "relu")
# The ops' overloads, called directly: one dispatcher call, autograd included (csrc/autograd.cpp).
_forward_train = ops.forward_train.default
_forward_eval = ops.forward_eval.default


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    activation=None,
    residual=None,
):
    """Batch normalisation with ``torch.nn.functional.batch_norm``'s signature and semantics.

    training=True normalises with the batch statistics and, when ``running_mean`` and
    ``running_var`` are given, updates them in place, in the same op call:
    ``running = (1 - momentum) * running + momentum * batch`` (variance unbiased).
    training=False normalises with the running statistics and updates nothing.

    Extensions (keyword-only): ``residual`` (a tensor shaped like ``input``) is added after
    the affine transform, and ``activation="relu"`` applies a ReLU, both inside the
    normalisation pass: ``relu(bn(input) + residual)``.
    """
    # The op checks its tensors (shapes, dtypes, devices, eps, values per channel, running
    # statistics) before anything is written; what it cannot see is checked here.
    if activation not in _ACTIVATIONS:
        raise ValueError(f"fastbn: activation must be None or 'relu', got {activation!r}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, not {type(input).__name__}")
    if momentum is None:  # torch.batch_norm's message (modules pass momentum=None to the op itself)
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not NoneType")
    if (running_mean is None) != (running_var is None):
        raise ValueError("fastbn: running_mean and running_var must both be given or both be None")
    relu = activation == "relu"
    if training:
        return _forward_train(input, weight, bias, residual, running_mean, running_var, None, float(momentum), eps,
                              relu)[0]
    if running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    return _forward_eval(input, running_mean, running_var, weight, bias, residual, eps, relu)
