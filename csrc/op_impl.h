// The op bodies, written once for every device: checks, layout canonicalisation, output
// allocation and composition of the backend's passes. Instantiated with CpuBackend in
// cpu/bn_cpu.cpp and CudaBackend in cuda/cuda_backend.h, each registered for its
// dispatch key.
//
// A Backend provides (all per-channel tensors: accumulation dtype, contiguous, [C]):
//   batch_stats(g, x, mean, var)                                     mean, biased var
//   forward_train(o, y, mean, invstd, var)                           stats + normalise (o.mean unset)
//   normalize(o, y)                                                  y from o's statistics
//   backward(o, dy, training, sums, sum_dy, sum_dy_xhat, dx, dr)     fused reduce (if sums) + elementwise
//   grad_input(o, dy, sum_dy, sum_dy_xhat, count, dx, dr)            training elementwise part alone
//   update_running_stats(rm, rv, mean, var, momentum, count)
//   merge_stats(counts, means, vars, eps, mean, invstd, var)
// dx / dr may be undefined (not wanted); the backward sums are written when `sums` is true.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <initializer_list>
#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

namespace fastbn {

// Everything a pass needs, already checked and canonicalised.
struct Operands {
  Geometry g;
  at::Tensor x;          // canonical layout
  at::Tensor residual;   // x's layout, or undefined
  at::Tensor mean;       // [C]
  at::Tensor scale_src;  // [C]: invstd, or running variance when src_is_var
  bool src_is_var = false;
  double eps = 0.0;
  at::Tensor weight, bias;  // [C] or undefined
  bool relu = false;
};

using Opt = std::optional<at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor acc_empty(const at::Tensor& input, int64_t C) {
  return at::empty({C}, input.options().dtype(acc_dtype(input.scalar_type())));
}
inline at::Tensor unused_output(const at::Tensor& input) { return at::empty({0}, input.options()); }

// Common preparation: checks + canonical layout + per-channel parameters. `before_params`
// (optional) runs after the input's checks and before the parameters': the running
// statistics are checked there, in PyTorch's order.
template <class F>
inline Operands prepare(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual, bool relu,
                        F&& before_params) {
  check_input(input);
  Operands o;
  auto xg = canonical_input(input);
  o.x = xg.first;
  o.g = xg.second;
  before_params(o);
  o.weight = channel_param(weight, "weight", input, o.g.C);
  o.bias = channel_param(bias, "bias", input, o.g.C);
  o.residual = like_input(residual, "residual", input, o.x, o.g);
  o.relu = relu;
  return o;
}
inline Operands prepare(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual, bool relu) {
  return prepare(input, weight, bias, residual, relu, [](Operands&) {});
}

// Per-channel statistics of the operands: (mean, invstd) as given (set_stats), or the running
// statistics (mean, var) with eps, invstd computed by the kernels (set_running_stats).
inline void set_stats(Operands& o, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                      const char* mean_name, const char* scale_name) {
  o.mean = channel_param(mean, mean_name, input, o.g.C);
  o.scale_src = channel_param(scale, scale_name, input, o.g.C);
}
inline void set_running_stats(Operands& o, const at::Tensor& input, const at::Tensor& running_mean,
                              const at::Tensor& running_var, double eps) {
  check_eps(eps, /*training=*/false);
  set_stats(o, input, running_mean, running_var, "running_mean", "running_var");
  o.src_is_var = true;
  o.eps = eps;
}

template <class K>
Tensor4 forward_train(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual, double eps,
                      bool relu) {
  Operands o = prepare(input, weight, bias, residual, relu);
  check_eps(eps, /*training=*/true);
  check_train_count(input);
  o.eps = eps;
  at::Tensor y = empty_like_canonical(o.x);
  at::Tensor mean = acc_empty(input, o.g.C), invstd = acc_empty(input, o.g.C), var = acc_empty(input, o.g.C);
  if (o.g.numel() == 0) {
    mean.zero_();
    var.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
  } else {
    K::forward_train(o, y, mean, invstd, var);
  }
  return {y, mean, invstd, var};
}

template <class K>
at::Tensor forward_eval(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                        const Opt& weight, const Opt& bias, const Opt& residual, double eps, bool relu) {
  Operands o = prepare(input, weight, bias, residual, relu,
                       [&](Operands& p) { set_running_stats(p, input, running_mean, running_var, eps); });
  at::Tensor y = empty_like_canonical(o.x);
  if (o.g.numel() > 0) K::normalize(o, y);
  return y;
}

template <class K>
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& var, double momentum, int64_t count) {
  TORCH_CHECK(mean.defined() && var.defined() && mean.dim() == 1 && var.sizes() == mean.sizes(),
              "fastbn: update_running_stats expects 1-D batch mean and var of equal size");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "fastbn: batch mean must be float or double, got ", at::toString(mean.scalar_type()));
  TORCH_CHECK(var.scalar_type() == mean.scalar_type(), "fastbn: batch var must have the batch mean's dtype");
  const int64_t C = mean.numel();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&running_mean, &running_var, &var}) {
    TORCH_CHECK(t->device() == mean.device(),
                "Expected all tensors to be on the same device, but found at least two devices, ", mean.device(),
                " and ", t->device(), "!");
  }
  TORCH_CHECK(running_mean.numel() == C, "running_mean should contain ", C, " elements not ", running_mean.numel());
  TORCH_CHECK(running_var.numel() == C, "running_var should contain ", C, " elements not ", running_var.numel());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&running_mean, &running_var}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastbn: running statistics must be floating point, got ",
                at::toString(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(count >= 0, "fastbn: count must be non-negative, got ", count);
  TORCH_CHECK_VALUE(count != 1, "Expected more than 1 value per channel when training, got count 1");
  if (count == 0 || C == 0) return;
  const at::ScalarType acc = mean.scalar_type();
  const bool direct = running_mean.scalar_type() == acc && running_var.scalar_type() == acc &&
                      running_mean.is_contiguous() && running_var.is_contiguous();
  if (direct) {
    K::update_running_stats(running_mean, running_var, mean.contiguous(), var.contiguous(), momentum, count);
    return;
  }
  // Other dtype or strides: compute both in the accumulation dtype, then write both back.
  at::Tensor rm = running_mean.reshape({C}).to(acc).contiguous().clone();
  at::Tensor rv = running_var.reshape({C}).to(acc).contiguous().clone();
  K::update_running_stats(rm, rv, mean.contiguous(), var.contiguous(), momentum, count);
  running_mean.copy_(rm.view(running_mean.sizes()));
  running_var.copy_(rv.view(running_var.sizes()));
}

// Shared body of the two backward ops.
template <class K>
Tensor4 backward_common(Operands& o, const at::Tensor& grad_out, const at::Tensor& input, bool training,
                        std::array<bool, 4> mask, const Opt& weight, const Opt& bias) {
  at::Tensor dy = like_input(grad_out, "grad_out", input, o.x, o.g);
  TORCH_CHECK(dy.defined(), "fastbn: grad_out is undefined");
  const bool want_dx = mask[0];
  const bool want_dr = mask[3] && o.relu && o.residual.defined();
  const bool sums = (training && want_dx) || mask[1] || mask[2];
  at::Tensor dx = want_dx ? empty_like_canonical(o.x) : at::Tensor();
  at::Tensor dr = want_dr ? empty_like_canonical(o.x) : at::Tensor();
  at::Tensor sum_dy = acc_empty(input, o.g.C), sum_dy_xhat = acc_empty(input, o.g.C);
  if (o.g.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xhat.zero_();
  } else if (sums || want_dx || want_dr) {
    K::backward(o, dy, training, sums, sum_dy, sum_dy_xhat, dx, dr);
  }
  auto param_grad = [&](bool want, const at::Tensor& g, const Opt& p) {
    if (!want) return unused_output(input);
    const at::ScalarType dt = (p.has_value() && p->defined()) ? p->scalar_type() : g.scalar_type();
    return g.to(dt);
  };
  return {want_dx ? dx : unused_output(input), param_grad(mask[1], sum_dy_xhat, weight),
          param_grad(mask[2], sum_dy, bias), want_dr ? dr : unused_output(input)};
}

template <class K>
Tensor4 backward_train(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& save_mean,
                       const at::Tensor& save_invstd, const Opt& weight, const Opt& bias, const Opt& residual,
                       bool relu, std::array<bool, 4> mask) {
  Operands o = prepare(input, weight, bias, residual, relu);
  set_stats(o, input, save_mean, save_invstd, "save_mean", "save_invstd");
  return backward_common<K>(o, grad_out, input, /*training=*/true, mask, weight, bias);
}

template <class K>
Tensor4 backward_eval(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& running_mean,
                      const at::Tensor& running_var, const Opt& weight, const Opt& bias, const Opt& residual,
                      double eps, bool relu, std::array<bool, 4> mask) {
  Operands o = prepare(input, weight, bias, residual, relu,
                       [&](Operands& p) { set_running_stats(p, input, running_mean, running_var, eps); });
  return backward_common<K>(o, grad_out, input, /*training=*/false, mask, weight, bias);
}

// ---------------------------------------------------------------- split pieces (SyncBatchNorm)

template <class K>
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input) {
  check_input(input);
  auto xg = canonical_input(input);
  const Geometry& g = xg.second;
  at::Tensor mean = acc_empty(input, g.C), var = acc_empty(input, g.C);
  if (g.numel() == 0) {
    mean.zero_();
    var.zero_();
  } else {
    K::batch_stats(g, xg.first, mean, var);
  }
  return {mean, var};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_stats(const at::Tensor& counts, const at::Tensor& means,
                                                            const at::Tensor& vars, double eps) {
  TORCH_CHECK(means.dim() == 2 && vars.sizes() == means.sizes(),
              "fastbn: merge_stats expects means and vars of shape [world, C], got ", means.sizes(), " and ",
              vars.sizes());
  TORCH_CHECK(counts.numel() == means.size(0), "fastbn: merge_stats expects ", means.size(0), " counts, got ",
              counts.numel());
  TORCH_CHECK(means.scalar_type() == at::kFloat || means.scalar_type() == at::kDouble,
              "fastbn: merge_stats expects float or double statistics");
  TORCH_CHECK(vars.scalar_type() == means.scalar_type(), "fastbn: vars must have the means' dtype");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&counts, &vars}) {
    TORCH_CHECK(t->device() == means.device(),
                "Expected all tensors to be on the same device, but found at least two devices, ", means.device(),
                " and ", t->device(), "!");
  }
  check_eps(eps, /*training=*/true);
  const int64_t C = means.size(1);
  at::Tensor mean = at::empty({C}, means.options()), invstd = at::empty({C}, means.options()),
             var = at::empty({C}, means.options());
  if (C > 0) {
    K::merge_stats(counts.to(at::kLong).contiguous(), means.contiguous(), vars.contiguous(), eps, mean, invstd, var);
  }
  return {mean, invstd, var};
}

template <class K>
at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd, const Opt& weight,
                     const Opt& bias, const Opt& residual, bool relu) {
  Operands o = prepare(input, weight, bias, residual, relu);
  set_stats(o, input, mean, invstd, "mean", "invstd");
  at::Tensor y = empty_like_canonical(o.x);
  if (o.g.numel() > 0) K::normalize(o, y);
  return y;
}

template <class K>
std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                   const at::Tensor& mean, const at::Tensor& invstd,
                                                   const Opt& weight, const Opt& bias, const Opt& residual,
                                                   bool relu) {
  Operands o = prepare(input, weight, bias, residual, relu);
  set_stats(o, input, mean, invstd, "mean", "invstd");
  at::Tensor dy = like_input(grad_out, "grad_out", input, o.x, o.g);
  TORCH_CHECK(dy.defined(), "fastbn: grad_out is undefined");
  at::Tensor sum_dy = acc_empty(input, o.g.C), sum_dy_xhat = acc_empty(input, o.g.C);
  if (o.g.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xhat.zero_();
  } else {
    at::Tensor none;
    K::backward(o, dy, /*training=*/true, /*sums=*/true, sum_dy, sum_dy_xhat, none, none);
  }
  return {sum_dy, sum_dy_xhat};
}

template <class K>
std::tuple<at::Tensor, at::Tensor> backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                                  const at::Tensor& mean, const at::Tensor& invstd,
                                                  const Opt& weight, const Opt& bias, const Opt& residual, bool relu,
                                                  const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                                  int64_t count, std::array<bool, 2> mask) {
  Operands o = prepare(input, weight, bias, residual, relu);
  set_stats(o, input, mean, invstd, "mean", "invstd");
  at::Tensor sdy = channel_param(sum_dy, "sum_dy", input, o.g.C);
  at::Tensor sdx = channel_param(sum_dy_xhat, "sum_dy_xhat", input, o.g.C);
  TORCH_CHECK_VALUE(count >= 0, "fastbn: count must be non-negative, got ", count);
  at::Tensor dy = like_input(grad_out, "grad_out", input, o.x, o.g);
  TORCH_CHECK(dy.defined(), "fastbn: grad_out is undefined");
  const bool want_dr = mask[1] && o.relu && o.residual.defined();
  at::Tensor dx = mask[0] ? empty_like_canonical(o.x) : at::Tensor();
  at::Tensor dr = want_dr ? empty_like_canonical(o.x) : at::Tensor();
  if (o.g.numel() > 0 && (dx.defined() || dr.defined())) K::grad_input(o, dy, sdy, sdx, count, dx, dr);
  return {mask[0] ? dx : unused_output(input), want_dr ? dr : unused_output(input)};
}

// Registers every op for one dispatch key with backend K.
#define FASTBN_REGISTER_BACKEND(KEY, K)                                          \
  TORCH_LIBRARY_IMPL(fastbn, KEY, m) {                                           \
    m.impl("forward_train", &::fastbn::forward_train<K>);                        \
    m.impl("forward_eval", &::fastbn::forward_eval<K>);                          \
    m.impl("update_running_stats", &::fastbn::update_running_stats<K>);          \
    m.impl("backward_train", &::fastbn::backward_train<K>);                      \
    m.impl("backward_eval", &::fastbn::backward_eval<K>);                        \
    m.impl("batch_stats", &::fastbn::batch_stats<K>);                            \
    m.impl("merge_stats", &::fastbn::merge_stats<K>);                            \
    m.impl("normalize", &::fastbn::normalize<K>);                                \
    m.impl("backward_reduce", &::fastbn::backward_reduce<K>);                    \
    m.impl("backward_elemt", &::fastbn::backward_elemt<K>);                      \
  }

}  // namespace fastbn
