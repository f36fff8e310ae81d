"""``fastbn.SyncBatchNorm``: BatchNorm whose training statistics span every rank of a
``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA).

Each rank computes its local (count, mean, biased var) with fastbn's kernels; the ranks
all-gather them and merge them with Chan's formula (``fastbn::merge_stats``), so unequal
per-rank batch sizes give exactly the full-batch statistics, running variance included.
Backward all-reduces the per-channel sums (sum dy, sum dy * xhat) and applies the full-batch
formula; the weight and bias gradients returned are the rank's own, as with
``torch.nn.SyncBatchNorm`` (data-parallel training sums or averages them across ranks).
The merged count, the running statistics' update and num_batches_tracked stay on the device
(``merge_stats``, ``backward_elemt`` take the count as a tensor): no host synchronisation.
"""
import torch
import torch.distributed as dist

from ._ops import acc_dtype, ops
from .modules import _BatchNormAct, _BatchNormForward, _forward, _fx_call_module, running_args


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, process_group,
                world_size):
        channels = input.shape[1]
        mean, var = ops.batch_stats(input)
        # One float64 message per rank: [count, mean (C), var (C)] (counts exact to 2^53).
        local = torch.cat([mean.new_full((1,), input.numel() // channels, dtype=torch.float64), mean.double(),
                           var.double()])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        table = torch.stack(gathered)
        acc = acc_dtype(input.dtype)
        # The merged statistics, the running statistics' update and the total count stay on the
        # device: nothing here waits for it.
        mean, invstd, var, total = ops.merge_stats(table[:, 0], table[:, 1:channels + 1].to(acc),
                                                   table[:, channels + 1:].to(acc), running_mean, running_var,
                                                   num_batches_tracked, momentum, eps)
        out = ops.normalize(input, mean, invstd, weight, bias, None, False)
        ctx.save_for_backward(input, weight, bias, mean, invstd, total)
        ctx.process_group = process_group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd, total = ctx.saved_tensors
        sum_dy, sum_dy_xhat = ops.backward_reduce(grad_out, x, mean, invstd, weight, bias, None, False)
        grad_input = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(bias.dtype)
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(packed, group=ctx.process_group)
            g_dy, g_dy_xhat = packed.split(sum_dy.numel())
            grad_input, _ = ops.backward_elemt(grad_out, x, mean, invstd, weight, bias, None, False, g_dy, g_dy_xhat,
                                               total, [True, False])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on fastbn's kernels: the same constructor (incl.
    ``process_group``), attributes, input checks, state_dict and ``convert_sync_batchnorm``.
    In eval mode, or when torch.distributed is not initialised or the group has one rank, it
    behaves as fastbn's plain BatchNorm. Unlike torch's, it also synchronises CPU tensors
    (gloo), DistributedDataParallel included: it subclasses ``_BatchNorm`` as torch's does,
    not ``torch.nn.SyncBatchNorm`` itself, whose isinstance check makes DDP refuse CPU
    modules (so ``isinstance(m, torch.nn.SyncBatchNorm)`` is False). A training step makes
    no host synchronisation: the merged batch size stays on the device. Under torch.jit.script
    it runs in eval mode only (a scripted module cannot reach torch.distributed)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.training:
                raise RuntimeError("fastbn.SyncBatchNorm: a TorchScript module cannot synchronise ranks; script it "
                                   "in eval mode (inference), or train with torch.compile or eager")
            return self._scripted_forward(input, None, False)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input):
        if isinstance(input, torch.fx.Proxy):
            return _fx_call_module(self, input, None)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group, world = None, 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group else dist.group.WORLD
            world = dist.get_world_size(group)
        if world <= 1:
            return _forward(self, input)
        rm, rv, nbt, momentum = running_args(self)
        return _SyncBatchNormFn.apply(input, self.weight, self.bias, rm, rv, nbt, self.eps, momentum, group, world)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Returns ``module`` with every BatchNorm*d (torch's or fastbn's) and
        ``torch.nn.SyncBatchNorm`` replaced by ``fastbn.SyncBatchNorm``, sharing their
        parameters and buffers (a new module if ``module`` itself is one)."""
        from .convert import replace_batchnorms

        def pick(m):
            if isinstance(m, cls):
                return None
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, _BatchNormAct):
                return cls
            return None

        return replace_batchnorms(module, pick, process_group=process_group)

