"""Batching rules of fastbn's ops for ``torch.vmap`` (``torch.library.register_vmap``).

B BatchNorms of C channels each are one BatchNorm of B*C channels: every rule moves the vmapped
dimension next to the channels, folds the two into one (per-channel tensors ``[B, C]`` become
``[B*C]``; an unbatched argument is repeated B times), calls the op once, and splits the
results again (outputs shaped like the input come back batched at dimension 1, per-channel
outputs at dimension 0). This is PyTorch's own batching rule for ``aten::native_batch_norm``.

Running statistics are updated in place, so under vmap a training forward that updates them
needs them batched (one set per model, as ``torch.func.stack_module_state`` gives): a batched
input updating one shared set is refused with PyTorch's message. ``num_batches_tracked`` must
then be batched too; with ``momentum=None`` each model's factor is its own ``1 /
num_batches_tracked``, so that case runs the op once per model.
"""
import torch

from ._ops import ops

_SHARED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in place, "
    "were not batched.\nIf you are using a module and do not need eval mode, please set `track_running_stats` to "
    "False.If you are using a prebuilt module and do not need eval mode, please see the functorch website for "
    "resources on how to patch your module to work with vmap")
_SHARED_BATCHES = ("fastbn: under vmap, num_batches_tracked must be batched like running_mean and running_var (it "
                   "is incremented in place, once per model)")


def _fold_values(t, bdim, batch):
    """(N, C, *S) values batched at `bdim` (or unbatched: repeated) -> (N, batch*C, *S)."""
    if t is None:
        return None
    t = t.unsqueeze(1).expand(t.shape[0], batch, *t.shape[1:]) if bdim is None else t.movedim(bdim, 1)
    return t.reshape(t.shape[0], batch * t.shape[2], *t.shape[3:])


def _fold_channels(t, bdim, batch):
    """A per-channel tensor (C elements) batched at `bdim` (or unbatched: repeated) -> [batch*C]."""
    if t is None:
        return None
    if bdim is None:
        return t.reshape(1, -1).expand(batch, -1).reshape(-1)
    return t.movedim(bdim, 0).reshape(-1)


def _fold_state(t, bdim):
    """A batched running statistic as one [B*C] tensor the op updates in place, and the function
    that writes it back where it had to be a copy (its batch dimension not outermost in memory)."""
    if t is None:
        return None, lambda: None
    per_model = t.movedim(bdim, 0)
    try:
        return per_model.view(-1), lambda: None
    except RuntimeError:
        flat = per_model.reshape(-1)
        return flat, lambda: per_model.copy_(flat.view(per_model.shape))


def _split_values(t, batch):
    """(N, batch*C, *S) -> (N, batch, C, *S): out_dim 1; an empty placeholder stays unbatched."""
    return (t, None) if t.numel() == 0 and t.dim() == 1 else (t.unflatten(1, (batch, -1)), 1)


def _split_channels(t, batch):
    """[batch*C] -> [batch, C]: out_dim 0; an empty placeholder stays unbatched."""
    return (t, None) if t.numel() == 0 and t.dim() == 1 else (t.view(batch, -1), 0)


# How each argument and output of an op is folded and split: "v" shaped like the input, "c"
# per channel, "-" not batched (passed as it is).
_FOLD = {"v": _fold_values, "c": _fold_channels}
_SPLIT = {"v": _split_values, "c": _split_channels}


def _fold_args(args, in_dims, kinds, batch):
    """`args` (vmapped at `in_dims`) folded by their `kinds` for one call of the op."""
    return [a if k == "-" else _FOLD[k](a, d, batch) for a, d, k in zip(args, in_dims, kinds)]


def _split_outputs(outputs, kinds, batch):
    """(outputs, out_dims) of a vmap rule for the op's `outputs` (a tuple) of the given kinds."""
    pairs = [_SPLIT[k](t, batch) for t, k in zip(outputs, kinds)]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _per_model(info, in_dims, op, args):
    """The op once per model (the vmapped slices of the batched arguments; in-place updates of
    batched running statistics land in their slices), results stacked at dimension 0."""
    outs = []
    for i in range(info.batch_size):
        outs.append(op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))))
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


@torch.library.register_vmap("fastbn::forward_train")
def _forward_train_vmap(info, in_dims, input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                        momentum, eps, relu):
    B = info.batch_size
    drm, drv, dn = in_dims[4:7]
    if running_mean is not None or running_var is not None:
        if drm is None or drv is None:
            raise RuntimeError(_SHARED_RUNNING_STATS)
        if num_batches_tracked is not None and dn is None:
            raise RuntimeError(_SHARED_BATCHES)
    if momentum is None and num_batches_tracked is not None:
        args = (input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, relu)
        return _per_model(info, in_dims, ops.forward_train.default, args)
    rm, write_rm = _fold_state(running_mean, drm)
    rv, write_rv = _fold_state(running_var, drv)
    operands = _fold_args((input, weight, bias, residual), in_dims, "vccv", B)
    outputs = ops.forward_train.default(*operands, rm, rv, None, momentum, eps, relu)
    write_rm()
    write_rv()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return _split_outputs(outputs, "vccc", B)


def _register_folded(name, arg_kinds, out_kinds):
    """Registers the batching rule of ``fastbn::<name>``: its arguments folded and its outputs
    split by kind (_FOLD, _SPLIT), the op called once."""
    op = getattr(ops, name).default

    def rule(info, in_dims, *args):
        out = op(*_fold_args(args, in_dims, arg_kinds, info.batch_size))
        if isinstance(out, torch.Tensor):
            return _SPLIT[out_kinds](out, info.batch_size)
        return _split_outputs(out, out_kinds, info.batch_size)

    torch.library.register_vmap(f"fastbn::{name}", rule)


# (input, running_mean, running_var, weight, bias, residual, eps, relu) -> out
_register_folded("forward_eval", "vccccv--", "v")
# (grad_out, input, save_mean, save_invstd, weight, bias, residual, relu, output_mask) -> 4 grads
_register_folded("backward_train", "vvccccv--", "vccv")
# (grad_out, input, running_mean, running_var, weight, bias, residual, eps, relu, output_mask)
_register_folded("backward_eval", "vvccccv---", "vccv")
# (input, weight, bias, residual, mean, var, training, eps, relu) -> out
_register_folded("forward_composite", "vccvcc---", "v")
