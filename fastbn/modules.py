"""Drop-in modules: ``fastbn.BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``
(same constructor, parameters, buffers, ``state_dict``, ``repr``; ``isinstance`` checks
against torch's classes still hold) and run forward/backward on fastbn's kernels.

``fastbn.BatchNormAct1d/2d/3d`` add a fused ``relu(bn(x) + residual)``; they subclass
torch's ``_BatchNorm`` (not ``BatchNorm2d``, so code that folds plain BatchNorm layers into
convolutions does not mistake them for one) and keep the same state_dict keys.

Every layer works with the tools people run on models (README "Works with"): torch.func
transforms and forward-mode AD (fastbn/_autograd.py), torch.fx (each layer is a leaf module,
one ``call_module`` node, whatever the tracer), torch.jit.trace and torch.jit.script
(``_scripted_forward``), torch.compile and torch.export (the ops' fake implementations)."""
from typing import Optional

import torch

from .functional import forward_ops


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


def _fx_call_module(module, input, residual):
    """Under torch.fx tracing (a Proxy argument): one ``call_module`` node for `module`, as a
    tracer makes for torch.nn's layers, so the traced GraphModule calls the layer itself (its
    train/eval mode stays live) and nothing reads the Proxy's rank or values."""
    tracer = (input if isinstance(input, torch.fx.Proxy) else residual).tracer
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


@torch.jit.unused
def _forward(module, input, residual=None, activation=None):
    """One op call: the training forward (running statistics updated, num_batches_tracked
    incremented, inside the op and only once every check has passed), or the evaluation
    forward; batch statistics in eval too when the module keeps no running statistics.
    The ops' C++ autograd, or under torch.func transforms and forward-mode AD the Python one."""
    if isinstance(input, torch.fx.Proxy) or isinstance(residual, torch.fx.Proxy):
        return _fx_call_module(module, input, residual)
    module._check_input_dim(input)
    relu = activation == "relu"
    weight, bias = _param(module, "weight"), _param(module, "bias")
    train, evaluate = forward_ops()
    if module.training:
        rm, rv, nbt, momentum = running_args(module)
        return train(input, weight, bias, residual, rm, rv, nbt, momentum, module.eps, relu)[0]
    buffers = module._buffers
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    if rm is None and rv is None:
        return train(input, weight, bias, residual, None, None, None, 0.0, module.eps, relu)[0]
    return evaluate(input, rm, rv, weight, bias, residual, module.eps, relu)


class _BatchNormForward:
    """The forward of fastbn's BatchNorm layers: eager calls _forward (which reads the
    parameter and buffer dicts directly); torch.jit.script compiles ``_scripted_forward``,
    the same (with running_args) in TorchScript."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, None, False)
        return _forward(self, input)

    def _scripted_forward(self, input: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        self._check_input_dim(input)
        rm: Optional[torch.Tensor] = self.running_mean
        rv: Optional[torch.Tensor] = self.running_var
        if self.training or (rm is None and rv is None):
            nbt: Optional[torch.Tensor] = self.num_batches_tracked
            momentum: Optional[float] = self.momentum
            if not self.training or not self.track_running_stats:
                rm, rv, nbt, momentum = None, None, None, 0.0
            elif momentum is None and nbt is None:
                momentum = 0.0
            return torch.ops.fastbn.forward_train(input, self.weight, self.bias, residual, rm, rv, nbt, momentum,
                                                  self.eps, relu)[0]
        assert rm is not None and rv is not None
        return torch.ops.fastbn.forward_eval(input, rm, rv, self.weight, self.bias, residual, self.eps, relu)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels: input (N, C, H, W), NCHW or channels_last."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels: input (N, C, D, H, W), NCDHW or channels_last_3d."""


class _BatchNormAct(_BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm followed by ``activation`` (``"relu"`` or ``None``), with an optional residual
    added before it, all inside fastbn's normalisation pass: ``forward(x, residual=None)``
    returns ``act(bn(x) + residual)``. The backward pass does not keep the output: the relu
    mask is recomputed from the input and the saved statistics."""

    activation: Optional[str]

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, activation="relu", **kwargs):
        if activation not in (None, "relu"):
            raise ValueError(f"fastbn: activation must be None or 'relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            activation = self.activation
            return self._scripted_forward(input, residual, activation is not None and activation == "relu")
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
