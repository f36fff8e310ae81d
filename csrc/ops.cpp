// Every fastbn op schema. The input checks all implementations share are in checks.cpp.
//
// Per-channel tensors returned by the ops (save_mean, save_invstd, batch var, sums) have the
// accumulation dtype: float for half/bfloat16/float input, double for double input.
#include <torch/library.h>

TORCH_LIBRARY(fastbn, m) {
  // Training forward: batch statistics, then y = (x - mean) * invstd * w + b [+ residual] [relu],
  // and the running statistics' update, all in one call. Returns (out, save_mean, save_invstd,
  // batch_var), batch_var biased; per-channel outputs in the accumulation dtype.
  // When running_mean and running_var are given they are updated in place:
  //   running = (1 - f) * running + f * batch (variance unbiased by m / (m - 1)),
  // f = momentum, or 1 / num_batches_tracked (after its increment) when momentum is None.
  // num_batches_tracked, when given, is incremented by one. Nothing is written before every
  // check has passed; an empty batch leaves the running statistics as they are.
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Evaluation forward with the running statistics (nothing is updated).
  m.def(
      "forward_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
      "Tensor? residual, float eps, bool relu) -> Tensor");
  // Backward of forward_train. output_mask selects (grad_input, grad_weight, grad_bias,
  // grad_residual); unselected outputs are empty tensors of shape [0]. grad_residual is only
  // produced with relu (without it, it is grad_out itself).
  m.def(
      "backward_train(Tensor grad_out, Tensor input, Tensor save_mean, Tensor save_invstd, Tensor? weight, "
      "Tensor? bias, Tensor? residual, bool relu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of forward_eval (statistics are constants).
  m.def(
      "backward_eval(Tensor grad_out, Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, Tensor? residual, float eps, bool relu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The forward as a differentiable composition of ATen ops (CompositeImplicitAutograd, so autograd,
  // forward-mode AD and torch.func transforms see through it): act((x - mean) / sqrt(var + eps) * w
  // + b + residual) in the accumulation dtype, returned in the input's dtype, with the batch
  // statistics when `training` (mean and var unused, may be None), else `mean` and `var` (the
  // running statistics). Used for double backward and forward-mode derivatives only; it does
  // not run fastbn's kernels.
  m.def(
      "forward_composite(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? mean, Tensor? var, "
      "bool training, float eps, bool relu) -> Tensor");
  // Split pieces (SyncBatchNorm). batch_stats: per-channel (mean, biased var) of the input.
  m.def("batch_stats(Tensor input) -> (Tensor, Tensor)");
  // Chan merge of per-rank statistics: counts [W] (any numeric dtype), means/vars [W, C]
  // (biased). Returns (mean, invstd, var, count) of the union: var biased, count the total
  // number of values per channel (int64, 0-dim). Running statistics as in forward_train, with
  // that total count (none updated when it is 0).
  m.def(
      "merge_stats(Tensor counts, Tensor means, Tensor vars, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Elementwise normalisation with given statistics (mean, invstd).
  m.def(
      "normalize(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "bool relu) -> Tensor");
  // Per-channel (sum dy_eff, sum dy_eff * xhat), dy_eff = grad_out masked by relu when relu.
  m.def(
      "backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "Tensor? residual, bool relu) -> (Tensor, Tensor)");
  // grad_input (training formula over `count` values in total: a one-element integer tensor
  // on the input's device, read there) and grad_residual from the reduced sums; output_mask
  // selects (grad_input, grad_residual).
  m.def(
      "backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "Tensor? residual, bool relu, Tensor sum_dy, Tensor sum_dy_xhat, Tensor count, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
}
