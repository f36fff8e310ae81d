"""``fastbn.SyncBatchNorm``: BatchNorm whose training statistics span every rank of a
``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA).

Each rank computes its local (count, mean, biased var) with fastbn's kernels; the ranks
all-gather them and merge them with Chan's formula (``fastbn::merge_stats``), so unequal
per-rank batch sizes give exactly the full-batch statistics, running variance included.
Backward all-reduces the per-channel sums (sum dy, sum dy * xhat) and applies the full-batch
formula; the weight and bias gradients returned are the rank's own, as with
``torch.nn.SyncBatchNorm`` (data-parallel training sums or averages them across ranks).
"""
import torch
import torch.distributed as dist

from ._ops import acc_dtype, ops
from .modules import _BatchNormAct, _forward, running_stats_factor


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        channels = input.shape[1]
        count = input.numel() // channels
        mean, var = ops.batch_stats(input)
        # One float64 message per rank: [count, mean (C), var (C)] (counts exact to 2^53).
        local = torch.cat([mean.new_full((1,), count, dtype=torch.float64), mean.double(), var.double()])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        table = torch.stack(gathered)
        counts = table[:, 0].round().to(torch.int64)
        acc = acc_dtype(input.dtype)
        means = table[:, 1:channels + 1].to(acc)
        vars_ = table[:, channels + 1:].to(acc)
        total = int(counts.sum())  # needed on the host for the unbiased factor and dx
        mean, invstd, var = ops.merge_stats(counts, means, vars_, eps)
        if running_mean is not None and running_var is not None and total > 0:
            ops.update_running_stats(running_mean, running_var, mean, var, float(momentum), total)
        out = ops.normalize(input, mean, invstd, weight, bias, None, False)
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.total, ctx.process_group = total, process_group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
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
                                               ctx.total, [True, False])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on fastbn's kernels (same constructor, incl.
    ``process_group``, and state_dict). In eval mode, or when torch.distributed is not
    initialised or the group has one rank, it behaves as fastbn's plain BatchNorm. Unlike
    torch's, it also synchronises CPU tensors (gloo). Reading the merged batch size costs one
    host synchronisation per training forward."""

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group, world = None, 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group else dist.group.WORLD
            world = dist.get_world_size(group)
        if world <= 1:
            return _forward(self, input)
        tracking, factor = running_stats_factor(self)
        out = _SyncBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if tracking else None,
                                     self.running_var if tracking else None, self.eps, factor, group, world)
        if tracking:
            self.num_batches_tracked.add_(1)
        return out

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

