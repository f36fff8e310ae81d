"""Drop-in modules: ``fastbn.BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``
(same constructor, parameters, buffers, ``state_dict``, ``repr``; ``isinstance`` checks
against torch's classes still hold) and run forward/backward on fastbn's kernels.

``fastbn.BatchNormAct1d/2d/3d`` add a fused ``relu(bn(x) + residual)``; they subclass
torch's ``_BatchNorm`` (not ``BatchNorm2d``, so code that folds plain BatchNorm layers into
convolutions does not mistake them for one) and keep the same state_dict keys."""
import torch

from . import functional as _F


def running_stats_factor(module):
    """(tracking, factor): whether this training call updates the running statistics, and
    the weight of the batch statistics in that update (PyTorch's convention; with
    momentum=None, the cumulative average over the batches seen, this one included)."""
    tracking = module.training and module.track_running_stats and module.num_batches_tracked is not None
    if tracking and module.momentum is None:
        return tracking, 1.0 / float(module.num_batches_tracked + 1)
    return tracking, 0.0 if module.momentum is None else module.momentum


def _forward(module, input, residual=None, activation=None):
    module._check_input_dim(input)
    tracking, factor = running_stats_factor(module)
    # Batch statistics in training, and in eval when no running statistics are kept.
    bn_training = module.training or (module.running_mean is None and module.running_var is None)
    use_buffers = not module.training or module.track_running_stats
    out = _F.batch_norm(
        input,
        module.running_mean if use_buffers else None,
        module.running_var if use_buffers else None,
        module.weight,
        module.bias,
        bn_training,
        factor,
        module.eps,
        activation=activation,
        residual=residual,
    )
    if tracking:  # only after success: a rejected input changes no state
        module.num_batches_tracked.add_(1)
    return out


class BatchNorm1d(torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels: input (N, C) or (N, C, L)."""

    def forward(self, input):
        return _forward(self, input)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels: input (N, C, H, W), NCHW or channels_last."""

    def forward(self, input):
        return _forward(self, input)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels: input (N, C, D, H, W), NCDHW or channels_last_3d."""

    def forward(self, input):
        return _forward(self, input)


class _BatchNormAct(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm followed by ``activation`` (``"relu"`` or ``None``), with an optional residual
    added before it, all inside fastbn's normalisation pass: ``forward(x, residual=None)``
    returns ``act(bn(x) + residual)``. The backward pass does not keep the output: the relu
    mask is recomputed from the input and the saved statistics."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, activation="relu", **kwargs):
        if activation not in (None, "relu"):
            raise ValueError(f"fastbn: activation must be None or 'relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.activation = activation

    def forward(self, input, residual=None):
        return _forward(self, input, residual, self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_BatchNormAct):
    """``act(BatchNorm1d(x) + residual)``: input (N, C) or (N, C, L)."""

    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class BatchNormAct2d(_BatchNormAct):
    """``act(BatchNorm2d(x) + residual)``: input (N, C, H, W), NCHW or channels_last."""

    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchNormAct3d(_BatchNormAct):
    """``act(BatchNorm3d(x) + residual)``: input (N, C, D, H, W)."""

    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim
