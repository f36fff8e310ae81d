"""autograd Functions over the fastbn ops.

The forward and first-order gradients come from the kernels (``fastbn::forward_train``,
``backward_train``, ...). The one exception is double backward: when a graph of the backward
is asked for (``create_graph=True``), the gradients are computed from
``_double_backward_graph``, a second BatchNorm written as a differentiable composition of
torch ops, so that autograd can differentiate them again (higher-order derivatives exact).
It is used for nothing else.
"""
import torch

from ._ops import acc_dtype, ops


def _double_backward_graph(x, weight, bias, residual, mean, var, training, eps, relu):
    """The forward, ``act((x - mean) / sqrt(var + eps) * weight + bias + residual)``, as a
    differentiable composition of torch ops (batch statistics when `training`, else `mean`
    and `var`), computed in the accumulation dtype and returned in x's dtype. Only double
    backward uses it (see the module docstring)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    xf = x.to(acc_dtype(x.dtype))
    if training:
        dims = [0] + list(range(2, x.dim()))
        mean = xf.mean(dims, keepdim=True)
        var = (xf - mean).square().mean(dims, keepdim=True)
    else:
        mean = mean.to(xf.dtype).view(shape)
        var = var.to(xf.dtype).view(shape)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(xf.dtype).view(shape)
    if residual is not None:
        y = y + residual.to(xf.dtype)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def _double_backward(ctx, grad_out, x, weight, bias, residual, mean, var, training):
    inputs = (x, weight, bias, residual)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        y = _double_backward_graph(x, weight, bias, residual, mean, var, training, ctx.eps, ctx.relu)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    out = [None] * 4
    for i, g in zip(wanted, grads):
        out[i] = g
    if ctx.residual_given and not ctx.relu and ctx.needs_input_grad[3]:
        out[3] = grad_out  # d(y + r)/dr = 1; the residual is not saved without relu
    return out


def _grads(ctx, grad_out, gi, gw, gb, gr, mask, residual_given):
    """Maps the op's masked outputs to autograd's per-input gradients."""
    if residual_given and not ctx.relu and ctx.needs_input_grad[3]:
        gr = grad_out  # d(y + r)/dr = 1
    elif not mask[3]:
        gr = None
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, gr)


def _mask(ctx, weight, bias, residual):
    n = ctx.needs_input_grad
    return [n[0], weight is not None and n[1], bias is not None and n[2], residual is not None and ctx.relu and n[3]]


class BatchNormTrain(torch.autograd.Function):
    """Training forward: ``(out, batch_mean, batch_var)``; the statistics are not differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, relu):
        out, mean, invstd, var = ops.forward_train(input, weight, bias, residual, eps, relu)
        ctx.eps, ctx.relu = eps, relu
        ctx.residual_given = residual is not None
        ctx.save_for_backward(input, weight, bias, residual if relu else None, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        # The statistics' gradients are never used: no zero tensors are made for them.
        ctx.set_materialize_grads(False)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        if grad_out is None:  # only reachable through the statistics: no gradient flows
            return None, None, None, None, None, None
        x, weight, bias, residual, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_double_backward(ctx, grad_out, x, weight, bias, residual, None, None, True), None, None)
        mask = _mask(ctx, weight, bias, residual)
        gi, gw, gb, gr = ops.backward_train(grad_out, x, mean, invstd, weight, bias, residual, ctx.relu, mask)
        return (*_grads(ctx, grad_out, gi, gw, gb, gr, mask, ctx.residual_given), None, None)


class BatchNormEval(torch.autograd.Function):
    """Evaluation forward with running statistics (constants for autograd)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, eps, relu):
        out = ops.forward_eval(input, running_mean, running_var, weight, bias, residual, eps, relu)
        ctx.eps, ctx.relu = eps, relu
        ctx.residual_given = residual is not None
        ctx.save_for_backward(input, weight, bias, residual if relu else None, running_mean, running_var)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, residual, rm, rv = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_double_backward(ctx, grad_out, x, weight, bias, residual, rm, rv, False), None, None, None, None)
        mask = _mask(ctx, weight, bias, residual)
        gi, gw, gb, gr = ops.backward_eval(grad_out, x, rm, rv, weight, bias, residual, ctx.eps, ctx.relu, mask)
        return (*_grads(ctx, grad_out, gi, gw, gb, gr, mask, ctx.residual_given), None, None, None, None)
