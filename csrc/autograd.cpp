// Autograd of forward_train and forward_eval, registered at the Autograd key (every device), so
// that Python, C++ callers, torch.compile and torch.export all see differentiable ops and a
// training step runs no Python of fastbn's between the module and the kernels; merge_stats is
// registered there too, only to keep the version counters of what it mutates.
//
// First-order gradients come from the backward ops (backward_train, backward_eval). When a
// graph of the backward is asked for (create_graph=True: double backward), the gradients are
// instead computed by differentiating a second BatchNorm written as a composition of ATen ops
// (double_backward_graph), so that autograd can differentiate them again; it is used for
// nothing else (and, as the op fastbn::forward_composite, by the Python autograd Function that
// torch.func transforms use). The running statistics and num_batches_tracked are not differentiable; the
// ops mutate them in place, and their version counters are bumped here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fastbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = std::optional<at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using ForwardTrainSig = Tensor4(const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&,
                                const Opt&, std::optional<double>, double, bool);
using ForwardEvalSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                                  const Opt&, double, bool);
using BackwardTrainSig = Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const Opt&, const Opt&, const Opt&, bool, std::array<bool, 4>);
using MergeStatsSig = Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                              const Opt&, std::optional<double>, double);
using BackwardEvalSig = Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const Opt&, const Opt&, const Opt&, double, bool, std::array<bool, 4>);

// NAME_op(): the dispatcher's handle of fastbn::NAME, looked up once.
#define FASTBN_OP_HANDLE(NAME, SIG)                                                         \
  const c10::TypedOperatorHandle<SIG>& NAME##_op() {                                        \
    static const auto op =                                                                  \
        c10::Dispatcher::singleton().findSchemaOrThrow("fastbn::" #NAME, "").typed<SIG>();  \
    return op;                                                                              \
  }
FASTBN_OP_HANDLE(forward_train, ForwardTrainSig)
FASTBN_OP_HANDLE(forward_eval, ForwardEvalSig)
FASTBN_OP_HANDLE(backward_train, BackwardTrainSig)
FASTBN_OP_HANDLE(backward_eval, BackwardEvalSig)
FASTBN_OP_HANDLE(merge_stats, MergeStatsSig)
#undef FASTBN_OP_HANDLE

bool given(const Opt& t) { return t.has_value() && t->defined(); }
at::Tensor value_or_undefined(const Opt& t) { return given(t) ? *t : at::Tensor(); }
Opt as_opt(const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); }
bool requires_grad(const Opt& t) { return given(t) && t->requires_grad(); }

// Whether a call records a graph: grad mode on and a differentiable input that requires grad.
bool records_graph(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(residual));
}

// Before an op mutates `mutated`: PyTorch's rule for inference tensors (an in-place update of
// one outside inference mode is an error), checked before anything is written.
void check_mutable(std::initializer_list<const Opt*> mutated) {
  for (const Opt* t : mutated) {
    TORCH_CHECK(!given(*t) || !(*t)->is_inference() || c10::InferenceMode::is_enabled(),
                "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get "
                "a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more "
                "details.");
  }
}

// After the op mutated them: their version counters record the in-place update.
void bump_versions(std::initializer_list<const Opt*> mutated) {
  for (const Opt* t : mutated) {
    if (given(*t) && !(*t)->is_inference()) torch::autograd::impl::bump_version(**t);
  }
}

// The forward as a differentiable composition of ATen ops, in the accumulation dtype, returned
// in x's dtype: act((x - mean) / sqrt(var + eps) * weight + bias + residual), with the batch
// statistics when `training`, else `mean` and `var`. Only double backward uses it.
at::Tensor double_backward_graph(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& residual, const at::Tensor& mean, const at::Tensor& var,
                                 bool training, double eps, bool relu) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(acc);
  at::Tensor m, v;
  if (training) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    m = xf.mean(dims, /*keepdim=*/true);
    v = (xf - m).square().mean(dims, /*keepdim=*/true);
  } else {
    m = mean.to(acc).view(shape);
    v = var.to(acc).view(shape);
  }
  at::Tensor y = (xf - m) * at::rsqrt(v + eps);
  if (weight.defined()) y = y * weight.to(acc).view(shape);
  if (bias.defined()) y = y + bias.to(acc).view(shape);
  if (residual.defined()) y = y + residual.to(acc);
  if (relu) y = at::relu(y);
  return y.to(x.scalar_type());
}

// Which of (input, weight, bias, residual) need a gradient, recorded at forward time.
struct Wanted {
  static int64_t encode(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual) {
    return (input.requires_grad() ? 1 : 0) | (requires_grad(weight) ? 2 : 0) | (requires_grad(bias) ? 4 : 0) |
           (requires_grad(residual) ? 8 : 0);
  }
  static bool has(const AutogradContext* ctx, int i) {
    return (ctx->saved_data.at("wanted").toInt() >> i) & 1;
  }
};

// What forward_train / forward_eval keep for the backward; saved = (x, weight, bias, residual
// when relu, a, b) with (a, b) = (save_mean, save_invstd) in training, (running_mean,
// running_var) in evaluation.
void save(AutogradContext* ctx, const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual,
          const at::Tensor& a, const at::Tensor& b, double eps, bool relu) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["relu"] = relu;
  ctx->saved_data["residual_given"] = given(residual);
  ctx->saved_data["wanted"] = Wanted::encode(input, weight, bias, residual);
  ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias),
                          relu ? value_or_undefined(residual) : at::Tensor(), a, b});
}

// The backward of either forward: (grad_input, grad_weight, grad_bias, grad_residual), each
// undefined where not wanted.
std::array<at::Tensor, 4> backward_common(AutogradContext* ctx, const at::Tensor& dy, bool training) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &residual = saved[3];
  const double eps = ctx->saved_data.at("eps").toDouble();
  const bool relu = ctx->saved_data.at("relu").toBool();
  const bool residual_given = ctx->saved_data.at("residual_given").toBool();
  std::array<at::Tensor, 4> out;
  if (at::GradMode::is_enabled()) {
    const std::array<at::Tensor, 4> inputs{x, weight, bias, residual};
    variable_list wanted;
    std::vector<int> index;
    for (int i = 0; i < 4; ++i) {
      if (inputs[i].defined() && Wanted::has(ctx, i)) {
        wanted.push_back(inputs[i]);
        index.push_back(i);
      }
    }
    if (!wanted.empty()) {
      const at::Tensor y = double_backward_graph(x, weight, bias, residual, training ? at::Tensor() : saved[4],
                                                 training ? at::Tensor() : saved[5], training, eps, relu);
      const variable_list grads = torch::autograd::grad({y}, wanted, {dy}, /*retain_graph=*/true,
                                                        /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t k = 0; k < index.size(); ++k) out[index[k]] = grads[k];
    }
  } else {
    const std::array<bool, 4> mask{Wanted::has(ctx, 0), weight.defined() && Wanted::has(ctx, 1),
                                   bias.defined() && Wanted::has(ctx, 2),
                                   residual.defined() && relu && Wanted::has(ctx, 3)};
    const Tensor4 g =
        training ? backward_train_op().call(dy, x, saved[4], saved[5], as_opt(weight), as_opt(bias),
                                            as_opt(residual), relu, mask)
                 : backward_eval_op().call(dy, x, saved[4], saved[5], as_opt(weight), as_opt(bias),
                                           as_opt(residual), eps, relu, mask);
    if (mask[0]) out[0] = std::get<0>(g);
    if (mask[1]) out[1] = std::get<1>(g);
    if (mask[2]) out[2] = std::get<2>(g);
    if (mask[3]) out[3] = std::get<3>(g);
  }
  if (residual_given && !relu && Wanted::has(ctx, 3)) out[3] = dy;  // d(y + r)/dr = 1; r is not saved
  return out;
}

// The running-statistics arguments of forward_train: passed through Function::apply as one
// non-differentiable argument.
struct RunningArgsRef {
  const Opt& mean;
  const Opt& var;
  const Opt& batches;
  std::optional<double> momentum;
};

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const Opt& weight, const Opt& bias,
                               const Opt& residual, const RunningArgsRef& run, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd, var] = forward_train_op().call(input, weight, bias, residual, run.mean, run.var,
                                                          run.batches, run.momentum, eps, relu);
    save(ctx, input, weight, bias, residual, mean, invstd, eps, relu);
    ctx->mark_non_differentiable({mean, invstd, var});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' (unused) gradients
    return {y, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);  // reached through the statistics only
    auto g = backward_common(ctx, grads[0], /*training=*/true);
    return {g[0], g[1], g[2], g[3], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct EvalFunction : public torch::autograd::Function<EvalFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const Opt& weight, const Opt& bias,
                            const Opt& residual, const at::Tensor& running_mean, const at::Tensor& running_var,
                            double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = forward_eval_op().call(input, running_mean, running_var, weight, bias, residual, eps, relu);
    save(ctx, input, weight, bias, residual, running_mean, running_var, eps, relu);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = backward_common(ctx, grads[0], /*training=*/false);
    return {g[0], g[1], g[2], g[3], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor4 forward_train_autograd(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual,
                               const Opt& running_mean, const Opt& running_var, const Opt& num_batches_tracked,
                               std::optional<double> momentum, double eps, bool relu) {
  check_mutable({&running_mean, &running_var, &num_batches_tracked});
  Tensor4 out;
  if (records_graph(input, weight, bias, residual)) {
    const variable_list o = TrainFunction::apply(
        input, weight, bias, residual, RunningArgsRef{running_mean, running_var, num_batches_tracked, momentum}, eps,
        relu);
    out = {o[0], o[1], o[2], o[3]};
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward_train_op().call(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                  momentum, eps, relu);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

at::Tensor forward_eval_autograd(const at::Tensor& input, const at::Tensor& running_mean,
                                 const at::Tensor& running_var, const Opt& weight, const Opt& bias,
                                 const Opt& residual, double eps, bool relu) {
  if (records_graph(input, weight, bias, residual)) {
    return EvalFunction::apply(input, weight, bias, residual, running_mean, running_var, eps, relu);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return forward_eval_op().call(input, running_mean, running_var, weight, bias, residual, eps, relu);
}

// merge_stats is not differentiable (SyncBatchNorm's autograd Function calls it in its
// forward); at the Autograd key it records the in-place update of the running statistics.
Tensor4 merge_stats_autograd(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& vars,
                             const Opt& running_mean, const Opt& running_var, const Opt& num_batches_tracked,
                             std::optional<double> momentum, double eps) {
  check_mutable({&running_mean, &running_var, &num_batches_tracked});
  Tensor4 out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = merge_stats_op().call(counts, means, vars, running_mean, running_var, num_batches_tracked, momentum, eps);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

// fastbn::forward_composite: double_backward_graph behind an op schema (the Python autograd
// Function used under torch.func transforms differentiates it, fastbn/_autograd.py).
at::Tensor forward_composite(const at::Tensor& input, const Opt& weight, const Opt& bias, const Opt& residual,
                             const Opt& mean, const Opt& var, bool training, double eps, bool relu) {
  TORCH_CHECK(training || (given(mean) && given(var)),
              "fastbn: forward_composite needs mean and var when training=False");
  return double_backward_graph(input, value_or_undefined(weight), value_or_undefined(bias),
                               value_or_undefined(residual), value_or_undefined(mean), value_or_undefined(var),
                               training, eps, relu);
}

}  // namespace
}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, CompositeImplicitAutograd, m) {
  m.impl("forward_composite", &fastbn::forward_composite);
}

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("forward_train", &fastbn::forward_train_autograd);
  m.impl("forward_eval", &fastbn::forward_eval_autograd);
  m.impl("merge_stats", &fastbn::merge_stats_autograd);
}
