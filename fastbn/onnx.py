"""ONNX export of eval-mode models containing fastbn layers (needs ``onnxscript``).

    import fastbn.onnx
    onnx_program = fastbn.onnx.export(model.eval(), (x,))      # torch.onnx.export, dynamo=True
    onnx_program.save("model.onnx")

Each fastbn op of an evaluation forward becomes standard ONNX (default domain, opset 18):
``BatchNormalization``, then ``Add`` of the residual and ``Relu`` where the layer has them, so
any ONNX runtime runs the model without fastbn. The graph computes as fastbn's kernels do: in
the accumulation dtype (float32 for float16/bfloat16 input: the input, residual, statistics
and weights are cast to it, the result is cast back to the input's dtype once). From opset 15
ONNX allows BatchNormalization's weights and statistics in another type than X (T1, T2), but
leaves the precision of the computation to the runtime, and onnxruntime's CPU has no
bfloat16 BatchNormalization.

An eval-mode layer without running statistics (``track_running_stats=False``) normalises
with its batch's statistics, which the graph computes (``ReduceMean``). A training forward
that updates running statistics in place has no ONNX equivalent: export ``model.eval()``.

``torch.onnx.export(model, (x,), custom_translation_table=fastbn.onnx.TRANSLATIONS)`` works
too where every fastbn layer has running statistics; ``export`` also handles the layers
without them (see ``_BatchStatsMode``). The TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, deprecated by PyTorch) is not supported.
"""
from typing import Optional

import torch
from onnxscript import DOUBLE, FLOAT, ir  # an ImportError where onnxscript is missing
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType
from torch.overrides import TorchFunctionMode

from . import _ops  # noqa: F401  (registers torch.ops.fastbn.*)

__all__ = ["TRANSLATIONS", "export"]

_TRAINING_ERROR = (
    "fastbn: ONNX export needs model.eval(): a training-mode BatchNorm forward updates the running "
    "statistics in place, which an ONNX graph cannot express. Call model.eval() before exporting.")

_forward_train = torch.ops.fastbn.forward_train.default


def _bind_forward_train(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
                        relu):
    """fastbn::forward_train's arguments, positional or keyword, as a tuple in schema order."""
    return input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, relu


def _batch_stats_forward(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor], eps: float,
                         relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastbn::forward_train`` without running statistics: (out, save_mean, save_invstd, batch_var)."""
    return _forward_train(input, weight, bias, residual, None, None, None, 0.0, eps, relu)


# The same as an op that declares no mutable argument (fake implementation: the same call,
# which dispatches to fastbn::forward_train's fake).
torch.library.custom_op("fastbn_onnx::forward_batch_stats", _batch_stats_forward, mutates_args=()).register_fake(
    _batch_stats_forward)


def _acc_type(dtype):
    """onnxscript type the kernels accumulate in for input of `dtype` (an ir.DataType)."""
    return DOUBLE if dtype == ir.DataType.DOUBLE else FLOAT


def _cast(value, to):
    """`value` (an ONNX value) cast to the onnxscript tensor type `to`; no node when it has that type."""
    return value if value.dtype == to.dtype else op.Cast(value, to=to.dtype)


def _per_channel(value, fill, input, acc):
    """A [C] ONNX value in `acc`: `value` cast to it, or `fill` repeated C times (C = input.shape[1])
    where `value` is None."""
    if value is not None:
        return _cast(value, acc)
    return op.ConstantOfShape(op.Shape(input, start=1, end=2), value=ir.tensor([fill], dtype=acc.dtype))


def _normalize(input, mean, var, weight, bias, residual, eps, relu):
    """``act(BatchNormalization(x) + residual)`` computed in the accumulation dtype of `input`
    ([N, C, ...]) with [C] statistics, returned in the input's dtype; also returns the
    accumulation type."""
    acc = _acc_type(input.dtype)
    x = _cast(input, acc)
    y = op.BatchNormalization(x, _per_channel(weight, 1.0, input, acc), _per_channel(bias, 0.0, input, acc),
                              _cast(mean, acc), _cast(var, acc), epsilon=eps)
    if residual is not None:
        y = op.Add(y, _cast(residual, acc))
    if relu:
        y = op.Relu(y)
    return (y if acc.dtype == input.dtype else op.Cast(y, to=input.dtype)), acc


def forward_eval(
    input: TensorType,
    running_mean: TensorType,
    running_var: TensorType,
    weight: Optional[TensorType] = None,
    bias: Optional[TensorType] = None,
    residual: Optional[TensorType] = None,
    eps: float = 1e-5,
    relu: bool = False,
) -> TensorType:
    """``fastbn::forward_eval``: ``act(bn(input) + residual)`` with the running statistics;
    input [N, C, ...] in any float dtype, per-channel tensors [C] (the input's dtype or its
    accumulation dtype); returns a tensor shaped like the input, in its dtype."""
    return _normalize(input, running_mean, running_var, weight, bias, residual, eps, relu)[0]


def _batch_stats_normalize(input, weight, bias, residual, eps, relu):
    """``act(bn(input) + residual)`` with the batch's mean and biased variance over every axis
    but 1. Returns (out, mean, invstd, var): out shaped like the input in its dtype, the others
    [C] in the accumulation dtype, invstd = 1 / sqrt(var + eps)."""
    acc = _acc_type(input.dtype)
    x = _cast(input, acc)
    axes = op.Constant(value_ints=[d for d in range(len(input.shape)) if d != 1])
    mean = op.ReduceMean(x, axes, keepdims=1)  # [1, C, 1, ...]
    centred = op.Sub(x, mean)
    var = op.ReduceMean(op.Mul(centred, centred), axes, keepdims=0)  # [C]
    mean = op.Reshape(mean, op.Constant(value_ints=[-1]))  # [C]
    out, _ = _normalize(input, mean, var, weight, bias, residual, eps, relu)
    invstd = op.Reciprocal(op.Sqrt(op.Add(var, op.Constant(value=ir.tensor(eps, dtype=acc.dtype)))))
    return out, mean, invstd, var


def forward_batch_stats(
    input: TensorType,
    weight: Optional[TensorType] = None,
    bias: Optional[TensorType] = None,
    residual: Optional[TensorType] = None,
    eps: float = 1e-5,
    relu: bool = False,
):
    """``fastbn_onnx::forward_batch_stats``: see ``_batch_stats_normalize`` (4 outputs)."""
    return _batch_stats_normalize(input, weight, bias, residual, eps, relu)


# torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATIONS). torch.export wraps
# every fastbn::forward_train call (its schema declares mutable arguments) in
# auto_functionalized, which the ONNX exporter cannot translate: export() routes the calls
# without running statistics to fastbn_onnx::forward_batch_stats instead (_BatchStatsMode).
TRANSLATIONS = {
    torch.ops.fastbn.forward_eval.default: forward_eval,
    torch.ops.fastbn_onnx.forward_batch_stats.default: forward_batch_stats,
}


class _BatchStatsMode(TorchFunctionMode):
    """Active while export() traces the model: a ``fastbn::forward_train`` call without running
    statistics becomes a ``fastbn_onnx::forward_batch_stats`` call (same outputs, nothing
    mutated); one with running statistics (a training forward) raises RuntimeError and sets
    ``refused``."""

    refused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _forward_train or func is torch.ops.fastbn.forward_train:
            (input, weight, bias, residual, running_mean, running_var, num_batches_tracked, _, eps,
             relu) = _bind_forward_train(*args, **(kwargs or {}))
            if running_mean is not None or running_var is not None or num_batches_tracked is not None:
                self.refused = True
                raise RuntimeError(_TRAINING_ERROR)
            return torch.ops.fastbn_onnx.forward_batch_stats(input, weight, bias, residual, eps, relu)
        return func(*args, **(kwargs or {}))


def export(model, args=(), f=None, **kwargs):
    """Exports the ``nn.Module`` `model` to ONNX: calls
    ``torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)``
    and returns its result (a ``torch.onnx.ONNXProgram``; also written to `f` where given).
    ``table`` is ``TRANSLATIONS`` updated with ``kwargs["custom_translation_table"]`` where
    given (the caller's entries win). During the call, ``fastbn::forward_train`` calls without
    running statistics (eval-mode layers with ``track_running_stats=False``) are traced as
    ``fastbn_onnx::forward_batch_stats`` (``_BatchStatsMode``).

    An ``ExportedProgram`` captured outside ``export`` keeps such calls as auto_functionalized
    nodes, which the ONNX exporter cannot translate: pass the module.

    Raises RuntimeError where the model runs a training forward that updates running
    statistics (call ``model.eval()`` first), and ValueError for ``dynamo=False``."""
    if not kwargs.pop("dynamo", True):
        raise ValueError("fastbn.onnx.export uses torch.onnx's dynamo exporter (its default); the "
                         "TorchScript-based one (dynamo=False, deprecated by PyTorch) is not supported")
    table = {**TRANSLATIONS, **(kwargs.pop("custom_translation_table", None) or {})}
    mode = _BatchStatsMode()
    try:
        with mode:
            return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
    except Exception as e:
        if mode.refused:  # torch.onnx wraps the error from the trace in its own
            raise RuntimeError(_TRAINING_ERROR) from e
        raise
