"""``fastbn.functional.batch_norm``: ``torch.nn.functional.batch_norm`` on fastbn's kernels."""
import torch

from . import _autograd
from ._ops import ops

_ACTIVATIONS = (None, "relu")
# The ops' overloads, called directly: one dispatcher call, autograd included (csrc/autograd.cpp;
# fastbn/_autograd.py under torch.func transforms and forward-mode AD).
_forward_train = ops.forward_train.default
_forward_eval = ops.forward_eval.default


def forward_ops():
    """(forward_train, forward_eval) for a call now: the ops' overloads, or under torch.func
    transforms and forward-mode AD their Python autograd Functions (same arguments)."""
    if _autograd.transforms_active():
        return _autograd.forward_train, _autograd.forward_eval
    return _forward_train, _forward_eval


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
    if isinstance(input, torch.fx.Proxy):  # torch.fx tracing: one call_function node for this function
        args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
        return input.tracer.create_proxy("call_function", batch_norm, args,
                                         dict(activation=activation, residual=residual))
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
    train, evaluate = forward_ops()
    if training:
        return train(input, weight, bias, residual, running_mean, running_var, None, float(momentum), eps, relu)[0]
    if running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    return evaluate(input, running_mean, running_var, weight, bias, residual, eps, relu)
