"""Drop-in modules: ``fastbn.BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``
(same constructor, parameters, buffers, ``state_dict``, ``repr``; ``isinstance`` checks
against torch's classes still hold) and run forward/backward on fastbn's kernels.

``fastbn.BatchNormAct1d/2d/3d`` add a fused ``relu(bn(x) + residual)``; they subclass
torch's ``_BatchNorm`` (not ``BatchNorm2d``, so code that folds plain BatchNorm layers into
convolutions does not mistake them for one) and keep the same state_dict keys."""
import torch



from .functional import _forward_eval, _forward_train


def _param(module, name):
    """module.<name> without nn.Module.__getattr__'s slow path where the parameter is
    registered (a parametrized one is a property, found the usual way)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def running_args(module):
    """(running_mean, running_var, num_batches_tracked, momentum) for a training call of
    `module`, PyTorch's convention: the buffers when it tracks running statistics (else None),
    and momentum None (the cumulative average over the batches seen, this one included) only
    where num_batches_tracked is there to count them (else 0.0, as PyTorch's factor)."""
    if not module.track_running_stats:
        return None, None, None, 0.0
    buffers = module._buffers
    nbt = buffers.get("num_batches_tracked")
    momentum = module.momentum
    if momentum is None and nbt is None:
        momentum = 0.0
    return buffers.get("running_mean"), buffers.get("running_var"), nbt, momentum


def _forward(module, input, residual=None, activation=None):
    """One op call: the training forward (running statistics updated, num_batches_tracked
    incremented, inside the op and only once every check has passed), or the evaluation
    forward; batch statistics in eval too when the module keeps no running statistics."""
    module._check_input_dim(input)
    relu = activation == "relu"
    weight, bias = _param(module, "weight"), _param(module, "bias")
    if module.training:
        rm, rv, nbt, momentum = running_args(module)
        return _forward_train(input, weight, bias, residual, rm, rv, nbt, momentum, module.eps, relu)[0]
    buffers = module._buffers
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    if rm is None and rv is None:
        return _forward_train(input, weight, bias, residual, None, None, None, 0.0, module.eps, relu)[0]
    return _forward_eval(input, rm, rv, weight, bias, residual, module.eps, relu)


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
