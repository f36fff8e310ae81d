"""``fastbn.functional.batch_norm``: ``torch.nn.functional.batch_norm`` on fastbn's kernels."""
import torch

from ._autograd import BatchNormEval, BatchNormTrain
from ._ops import ops

_ACTIVATIONS = (None, "relu")


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
    ``running_var`` are given, updates them in place:
    ``running = (1 - momentum) * running + momentum * batch`` (variance unbiased).
    training=False normalises with the running statistics and updates nothing.

    Extensions (keyword-only): ``residual`` (a tensor shaped like ``input``) is added after
    the affine transform, and ``activation="relu"`` applies a ReLU, both inside the
    normalisation pass: ``relu(bn(input) + residual)``.
    """
    # The ops check their tensors (shapes, dtypes, devices, eps, values per channel) before
    # anything is written; what they cannot see is checked here.
    if activation not in _ACTIVATIONS:
        raise ValueError(f"fastbn: activation must be None or 'relu', got {activation!r}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, not {type(input).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("fastbn: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and running_mean is not None and input.dim() >= 2:
        # forward_train does not take the running statistics (update_running_stats checks
        # them fully, after the forward): their sizes first, in PyTorch's order.
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.numel() != input.shape[1]:
                raise RuntimeError(f"{name} should contain {input.shape[1]} elements not {t.numel()}")
    relu = activation == "relu"
    # The autograd Function only when a gradient can flow (it costs ~15 us a call).
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, residual))
    if training:
        if grad:
            out, mean, var = BatchNormTrain.apply(input, weight, bias, residual, eps, relu)
        else:
            out, mean, _, var = ops.forward_train(input, weight, bias, residual, eps, relu)
        if running_mean is not None:
            channels = input.shape[1]
            count = input.numel() // channels if channels else 0
            ops.update_running_stats(running_mean, running_var, mean, var, float(momentum), count)
        return out
    if grad:
        return BatchNormEval.apply(input, weight, bias, residual, running_mean, running_var, eps, relu)
    return ops.forward_eval(input, running_mean, running_var, weight, bias, residual, eps, relu)
