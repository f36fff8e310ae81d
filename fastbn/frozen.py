"""``fastbn.FrozenBatchNorm2d``: torchvision's ``FrozenBatchNorm2d`` (the detection models'
norm layer: fixed statistics and affine parameters, all buffers) on fastbn's evaluation
kernel, in training mode too. Same constructor ``(num_features, eps=1e-5)``, buffers
(``weight``, ``bias``, ``running_mean``, ``running_var``), state_dict (a
``num_batches_tracked`` entry is dropped on load) and repr. Input ``(N, C, ...)``; the
gradient flows to the input only."""
import torch

from .functional import forward_ops
from .modules import _fx_call_module


class FrozenBatchNorm2d(torch.nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, per channel."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fastbn.forward_eval(x, self.running_mean, self.running_var, self.weight, self.bias, None,
                                                 self.eps, False)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            return _fx_call_module(self, x, None)
        b = self._buffers
        return forward_ops()[1](x, b["running_mean"], b["running_var"], b["weight"], b["bias"], None, self.eps, False)

    def __repr__(self):
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"
