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


def _results(pairs):
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
    dx, dw, db, dr, drm, drv, dn = in_dims[:7]
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
    y, mean, invstd, var = ops.forward_train.default(
        _fold_values(input, dx, B), _fold_channels(weight, dw, B), _fold_channels(bias, db, B),
        _fold_values(residual, dr, B), rm, rv, None, momentum, eps, relu)
    write_rm()
    write_rv()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return _results([_split_values(y, B), _split_channels(mean, B), _split_channels(invstd, B),
                     _split_channels(var, B)])


@torch.library.register_vmap("fastbn::forward_eval")
def _forward_eval_vmap(info, in_dims, input, running_mean, running_var, weight, bias, residual, eps, relu):
    B = info.batch_size
    dx, drm, drv, dw, db, dr = in_dims[:6]
    y = ops.forward_eval.default(
        _fold_values(input, dx, B), _fold_channels(running_mean, drm, B), _fold_channels(running_var, drv, B),
        _fold_channels(weight, dw, B), _fold_channels(bias, db, B), _fold_values(residual, dr, B), eps, relu)
    return _split_values(y, B)


def _backward_results(grads, B):
    gi, gw, gb, gr = grads
    return _results([_split_values(gi, B), _split_channels(gw, B), _split_channels(gb, B), _split_values(gr, B)])


@torch.library.register_vmap("fastbn::backward_train")
def _backward_train_vmap(info, in_dims, grad_out, input, save_mean, save_invstd, weight, bias, residual, relu,
                         output_mask):
    B = info.batch_size
    dg, dx, dm, ds, dw, db, dr = in_dims[:7]
    grads = ops.backward_train.default(
        _fold_values(grad_out, dg, B), _fold_values(input, dx, B), _fold_channels(save_mean, dm, B),
        _fold_channels(save_invstd, ds, B), _fold_channels(weight, dw, B), _fold_channels(bias, db, B),
        _fold_values(residual, dr, B), relu, output_mask)
    return _backward_results(grads, B)


@torch.library.register_vmap("fastbn::backward_eval")
def _backward_eval_vmap(info, in_dims, grad_out, input, running_mean, running_var, weight, bias, residual, eps, relu,
                        output_mask):
    B = info.batch_size
    dg, dx, drm, drv, dw, db, dr = in_dims[:7]
    grads = ops.backward_eval.default(
        _fold_values(grad_out, dg, B), _fold_values(input, dx, B), _fold_channels(running_mean, drm, B),
        _fold_channels(running_var, drv, B), _fold_channels(weight, dw, B), _fold_channels(bias, db, B),
        _fold_values(residual, dr, B), eps, relu, output_mask)
    return _backward_results(grads, B)


@torch.library.register_vmap("fastbn::forward_composite")
def _forward_composite_vmap(info, in_dims, input, weight, bias, residual, mean, var, training, eps, relu):
    B = info.batch_size
    dx, dw, db, dr, dm, dv = in_dims[:6]
    y = ops.forward_composite.default(
        _fold_values(input, dx, B), _fold_channels(weight, dw, B), _fold_channels(bias, db, B),
        _fold_values(residual, dr, B), _fold_channels(mean, dm, B), _fold_channels(var, dv, B), training, eps, relu)
    return _split_values(y, B)
