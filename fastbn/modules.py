"""Drop-in modules: ``fastbn.BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``
(same constructor, parameters, buffers, ``state_dict``, ``repr``; ``isinstance`` checks
against torch's classes still hold) and run forward/backward on fastbn's kernels."""
import torch

from . import functional as _F


def _forward(module, input, residual=None, activation=None):
    module._check_input_dim(input)
    tracking = module.training and module.track_running_stats and module.num_batches_tracked is not None
    if tracking:
        if module.momentum is None:  # cumulative moving average over the batches seen
            factor = 1.0 / float(module.num_batches_tracked + 1)
        else:
            factor = module.momentum
    else:
        factor = 0.0 if module.momentum is None else module.momentum
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
