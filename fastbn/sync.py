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
from .modules import _BatchNormAct, _forward, running_args


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


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on fastbn's kernels (same constructor, incl.
    ``process_group``, and state_dict). In eval mode, or when torch.distributed is not
    initialised or the group has one rank, it behaves as fastbn's plain BatchNorm. Unlike
    torch's, it also synchronises CPU tensors (gloo). A training step makes no host
    synchronisation: the merged batch size stays on the device."""

    def forward(self, input):
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

