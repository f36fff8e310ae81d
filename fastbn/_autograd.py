"""The autograd of fastbn's forward ops as Python ``torch.autograd.Function`` s, for what the
C++ autograd (csrc/autograd.cpp, the path of every other call) cannot serve: ``torch.func``
transforms (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``jvp``, ``hessian``, ``vmap`` over any of
them) and forward-mode AD with dual tensors. The modules and ``fastbn.functional`` pick these
where ``transforms_active()``.

Each Function runs the op itself in its forward (fastbn's kernels; running statistics updated
as in eager), its backward runs the backward op, and ``vmap`` goes through the ops' batching
rules (fastbn/_vmap.py, ``generate_vmap_rule``). Where a graph of the backward is needed
(grad mode on in the backward and a tensor there that requires grad: double backward,
``torch.func`` transforms, which always ask for one) and for forward-mode derivatives, they
differentiate ``fastbn::forward_composite``, the forward as a composition of ATen ops.
"""
import torch
import torch.autograd.forward_ad as fwAD

from . import _vmap  # noqa: F401  (registers the batching rules)
from ._ops import ops

_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack


def transforms_active():
    """Whether a torch.func transform or a forward-mode AD level (dual tensors) is active.
    False while torch.compile traces (it traces the ops, through their fake implementations,
    and gives functorch's interpreter stack a value of its own)."""
    if torch.compiler.is_compiling():
        return False
    return _peek_interpreter_stack() is not None or fwAD._current_level >= 0


def _composite_of(ctx, index):
    """The forward (``fastbn::forward_composite``) as a function of the operands (input, weight,
    bias, residual) at positions `index`, the others and the statistics as saved."""
    x, weight, bias, residual, a, b = ctx.saved_tensors
    saved = [x, weight, bias, residual]
    mean, var = (None, None) if ctx.training else (a, b)

    def forward(*given):
        operands = list(saved)
        for i, t in zip(index, given):
            operands[i] = t
        return ops.forward_composite(*operands, mean, var, ctx.training, ctx.eps, ctx.relu)

    return forward, [saved[i] for i in index]


def _setup(ctx, input, weight, bias, residual, a, b, eps, relu, training):
    """Saves what backward and jvp need: (input, weight, bias, residual) and the statistics
    (a, b): (save_mean, save_invstd) in training, (running_mean, running_var) in evaluation."""
    ctx.eps, ctx.relu, ctx.training = eps, relu, training
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, bias, residual, a, b)
    ctx.save_for_forward(input, weight, bias, residual, a, b)


def _grads(ctx, grad_out):
    """(grad_input, grad_weight, grad_bias, grad_residual), None where not wanted: the backward
    op, or where a graph of the backward is needed the vjp of the composite forward."""
    x, weight, bias, residual, a, b = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:4]
    operands = (x, weight, bias, residual)
    out = [None] * 4
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad_out,) + operands):
        index = [i for i in range(4) if wanted[i] and operands[i] is not None]
        forward, primals = _composite_of(ctx, index)
        for i, g in zip(index, torch.func.vjp(forward, *primals)[1](grad_out)):
            out[i] = g
        return out
    relu = ctx.relu
    mask = [wanted[0], wanted[1] and weight is not None, wanted[2] and bias is not None,
            wanted[3] and residual is not None and relu]
    if ctx.training:
        g = ops.backward_train.default(grad_out, x, a, b, weight, bias, residual, relu, mask)
    else:
        g = ops.backward_eval.default(grad_out, x, a, b, weight, bias, residual, ctx.eps, relu, mask)
    out = [g[i] if mask[i] else None for i in range(4)]
    if residual is not None and not relu and wanted[3]:
        out[3] = grad_out  # d(y + r)/dr = 1
    return out


def _tangent(ctx, tangents):
    """The output's tangent for the tangents of (input, weight, bias, residual): the jvp of
    the composite forward."""
    index = [i for i, t in enumerate(ctx.saved_tensors[:4]) if t is not None]
    forward, primals = _composite_of(ctx, index)
    given = tuple(torch.zeros_like(p) if tangents[i] is None else tangents[i] for i, p in zip(index, primals))
    if _peek_interpreter_stack() is not None:
        return torch.func.jvp(forward, tuple(primals), given)[1]
    # Dual tensors (torch.autograd.forward_ad): a dual level is open and cannot be nested, so
    # the composite runs on duals of this level (forward grads are off inside a jvp rule).
    with torch.autograd.forward_ad._set_fwd_grad_enabled(True):
        duals = [fwAD.make_dual(p.detach(), t) for p, t in zip(primals, given)]
        return fwAD.unpack_dual(forward(*duals)).tangent


class TrainFunction(torch.autograd.Function):
    """``fastbn::forward_train``: (out, save_mean, save_invstd, batch_var); the statistics are
    not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, relu):
        with torch.no_grad():  # the C++ autograd records nothing here
            return ops.forward_train.default(input, weight, bias, residual, running_mean, running_var,
                                             num_batches_tracked, momentum, eps, relu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, residual, _, _, _, _, eps, relu = inputs
        _, mean, invstd, var = output
        ctx.mark_non_differentiable(mean, invstd, var)
        _setup(ctx, input, weight, bias, residual, mean, invstd, eps, relu, True)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        if grad_out is None:
            return (None,) * 10
        return (*_grads(ctx, grad_out), None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        return _tangent(ctx, tangents[:4]), None, None, None


class EvalFunction(torch.autograd.Function):
    """``fastbn::forward_eval`` with its arguments reordered: (input, weight, bias, residual,
    running_mean, running_var, eps, relu) -> out."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, residual, running_mean, running_var, eps, relu):
        with torch.no_grad():
            return ops.forward_eval.default(input, running_mean, running_var, weight, bias, residual, eps, relu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, residual, running_mean, running_var, eps, relu = inputs
        _setup(ctx, input, weight, bias, residual, running_mean, running_var, eps, relu, False)

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 8
        return (*_grads(ctx, grad_out), None, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        return _tangent(ctx, tangents[:4])


def forward_train(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, relu):
    """``ops.forward_train`` through TrainFunction."""
    return TrainFunction.apply(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                               momentum, eps, relu)


def forward_eval(input, running_mean, running_var, weight, bias, residual, eps, relu):
    """``ops.forward_eval`` through EvalFunction."""
    return EvalFunction.apply(input, weight, bias, residual, running_mean, running_var, eps, relu)
