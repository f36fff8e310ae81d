// The op bodies, written once for every device: checks, layout canonicalisation, output
// allocation and composition of the backend's passes. Instantiated with CpuBackend in
// cpu/bn_cpu.cpp and CudaBackend in cuda/cuda_backend.h, each registered for its
// dispatch key.
//
// A Backend provides (all per-channel tensors: accumulation dtype, contiguous, [C]):
//   batch_stats(g, x, mean, var)                                     mean, biased var
//   forward_train(o, y, mean, invstd, var, run)                      stats + normalise + running update
//   normalize(o, y)                                                  y from o's statistics
//   backward(o, dy, training, sums, sum_dy, sum_dy_xhat, dx, dr)     fused reduce (if sums) + elementwise
//   grad_input(o, dy, sum_dy, sum_dy_xhat, count, dx, dr)            training elementwise part alone
//   merge_stats(counts, means, vars, eps, mean, invstd, var, total, run)
//   count_batch(num_batches_tracked)                                 += 1, in place
// dx / dr may be undefined (not wanted); the backward sums are written when `sums` is true.
// `run` (Running) holds the running statistics to update, if any; `count` and `total` are
// one-element int64 tensors on the device (read / written there, never on the host).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <initializer_list>
#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"
#include "dispatch.h"

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

// The running statistics an op updates (see RunningStats in bn_types.h): [C] accumulation-
// dtype contiguous tensors, undefined when there is no update; `batches` is
// num_batches_tracked when the factor is 1 / num_batches_tracked (momentum None).
struct Running {
  at::Tensor mean, var, batches;
  double momentum = 0.0;
  template <class Acc> RunningStats<Acc> view() const {
    return RunningStats<Acc>{mptr<Acc>(mean), mptr<Acc>(var), cptr<int64_t>(batches), momentum};
  }
};

// The running-statistics arguments of forward_train and merge_stats, checked (check_running)
// before anything is written, then applied around the kernels: begin() increments
// num_batches_tracked and returns the tensors the kernels update (the running statistics
// themselves when they are contiguous in the accumulation dtype, else copies), end() writes
// copies back.
class RunningArgs {
 public:
  RunningArgs() = default;
  // ref (named ref_name in messages): the tensor whose device they must be on.
  RunningArgs(const Opt& mean, const Opt& var, const Opt& batches, std::optional<double> momentum, at::ScalarType acc,
              const at::Tensor& ref, const char* ref_name, int64_t C)
      : acc_(acc), C_(C), momentum_(momentum) {
    const at::Device device = ref.device();
    const bool has_mean = mean.has_value() && mean->defined(), has_var = var.has_value() && var->defined();
    TORCH_CHECK_VALUE(has_mean == has_var, "fastbn: running_mean and running_var must both be given or both be None");
    if (has_mean) {
      mean_ = *mean;
      var_ = *var;
      for (const at::Tensor* t : {&mean_, &var_}) {
        const char* name = t == &mean_ ? "running_mean" : "running_var";
        TORCH_CHECK(t->numel() == C, name, " should contain ", C, " elements not ", t->numel());
        check_same_device(*t, name, ref, ref_name);
        TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastbn: ", name, " must be floating point, got ",
                    at::toString(t->scalar_type()));
      }
    }
    if (batches.has_value() && batches->defined()) {
      batches_ = *batches;
      TORCH_CHECK(batches_.numel() == 1 && batches_.scalar_type() == at::kLong && batches_.device() == device,
                  "fastbn: num_batches_tracked must be a one-element int64 tensor on ", device, ", got ",
                  at::toString(batches_.scalar_type()), " of ", batches_.numel(), " elements on ", batches_.device());
    }
    TORCH_CHECK_VALUE(!has_mean || momentum.has_value() || batches_.defined(),
                      "fastbn: momentum=None (cumulative average) needs num_batches_tracked");
  }

  // After every check of the op: the state changes from here on.
  template <class K> Running begin() {
    if (batches_.defined()) K::count_batch(batches_);
    Running r;
    if (!mean_.defined()) return r;
    r.mean = direct(mean_) ? mean_ : at::empty({C_}, mean_.options().dtype(acc_)).copy_(mean_.reshape({C_}));
    r.var = direct(var_) ? var_ : at::empty({C_}, var_.options().dtype(acc_)).copy_(var_.reshape({C_}));
    if (momentum_.has_value()) r.momentum = *momentum_;
    else r.batches = batches_;
    return r;
  }
  void end(const Running& r) {
    if (!mean_.defined()) return;
    if (!r.mean.is_same(mean_)) mean_.copy_(r.mean.view(mean_.sizes()));
    if (!r.var.is_same(var_)) var_.copy_(r.var.view(var_.sizes()));
  }

 private:
  bool direct(const at::Tensor& t) const { return t.scalar_type() == acc_ && t.is_contiguous(); }
  at::Tensor mean_, var_, batches_;
  at::ScalarType acc_ = at::kFloat;
  int64_t C_ = 0;
  std::optional<double> momentum_;
};

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
Tensor4 forward_train(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual,
                      const Opt& running_mean, const Opt& running_var, const Opt& num_batches_tracked,
                      std::optional<double> momentum, double eps, bool relu) {
  RunningArgs running;
  Operands o = prepare(input, weight, bias, residual, relu, [&](Operands& p) {
    running = RunningArgs(running_mean, running_var, num_batches_tracked, momentum, acc_dtype(input.scalar_type()),
                          input, "input", p.g.C);
  });
  check_eps(eps, /*training=*/true);
  check_train_count(input);
  o.eps = eps;
  at::Tensor y = empty_like_canonical(o.x);
  at::Tensor mean = acc_empty(input, o.g.C), invstd = acc_empty(input, o.g.C), var = acc_empty(input, o.g.C);
  Running run = running.template begin<K>();
  if (o.g.numel() == 0) {
    mean.zero_();
    var.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
  } else {
    K::forward_train(o, y, mean, invstd, var, run);
  }
  running.end(run);
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
Tensor4 merge_stats(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& vars,
                    const Opt& running_mean, const Opt& running_var, const Opt& num_batches_tracked,
                    std::optional<double> momentum, double eps) {
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
  RunningArgs running(running_mean, running_var, num_batches_tracked, momentum, means.scalar_type(), means, "means",
                      C);
  at::Tensor mean = at::empty({C}, means.options()), invstd = at::empty({C}, means.options()),
             var = at::empty({C}, means.options());
  const at::Tensor n = counts.to(at::kLong).contiguous();
  Running run = running.template begin<K>();
  at::Tensor total;
  if (C > 0) {
    total = at::empty({}, n.options());
    K::merge_stats(n, means.contiguous(), vars.contiguous(), eps, mean, invstd, var, total, run);
  } else {
    total = n.sum();
  }
  running.end(run);
  return {mean, invstd, var, total};
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
                                                  const at::Tensor& count, std::array<bool, 2> mask) {
  Operands o = prepare(input, weight, bias, residual, relu);
  set_stats(o, input, mean, invstd, "mean", "invstd");
  at::Tensor sdy = channel_param(sum_dy, "sum_dy", input, o.g.C);
  at::Tensor sdx = channel_param(sum_dy_xhat, "sum_dy_xhat", input, o.g.C);
  TORCH_CHECK(count.numel() == 1 && count.device() == input.device() && !at::isFloatingType(count.scalar_type()) &&
                  !at::isComplexType(count.scalar_type()),
              "fastbn: count must be a one-element integer tensor on ", input.device(), ", got ",
              at::toString(count.scalar_type()), " of ", count.numel(), " elements on ", count.device());
  const at::Tensor n = count.to(at::kLong).reshape({1}).contiguous();
  at::Tensor dy = like_input(grad_out, "grad_out", input, o.x, o.g);
  TORCH_CHECK(dy.defined(), "fastbn: grad_out is undefined");
  const bool want_dr = mask[1] && o.relu && o.residual.defined();
  at::Tensor dx = mask[0] ? empty_like_canonical(o.x) : at::Tensor();
  at::Tensor dr = want_dr ? empty_like_canonical(o.x) : at::Tensor();
  if (o.g.numel() > 0 && (dx.defined() || dr.defined())) K::grad_input(o, dy, sdy, sdx, n, dx, dr);
  return {mask[0] ? dx : unused_output(input), want_dr ? dr : unused_output(input)};
}

// Registers every op for one dispatch key with backend K.
#define FASTBN_REGISTER_BACKEND(KEY, K)                                          \
  TORCH_LIBRARY_IMPL(fastbn, KEY, m) {                                           \
    m.impl("forward_train", &::fastbn::forward_train<K>);                        \
    m.impl("forward_eval", &::fastbn::forward_eval<K>);                          \
    m.impl("backward_train", &::fastbn::backward_train<K>);                      \
    m.impl("backward_eval", &::fastbn::backward_eval<K>);                        \
    m.impl("batch_stats", &::fastbn::batch_stats<K>);                            \
    m.impl("merge_stats", &::fastbn::merge_stats<K>);                            \
    m.impl("normalize", &::fastbn::normalize<K>);                                \
    m.impl("backward_reduce", &::fastbn::backward_reduce<K>);                    \
    m.impl("backward_elemt", &::fastbn::backward_elemt<K>);                      \
  }

}  // namespace fastbn
