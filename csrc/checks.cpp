// The input checks and layout canonicalisation declared in checks.h, shared by every op
// implementation (CPU, CUDA, and the CUDA emulator's module).
#include "checks.h"

#include <string>

namespace fastbn {

namespace {
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Dense with the channel dimension innermost: (N, C, *S) stored as [N][*S][C].
bool is_channels_last_dense(const at::Tensor& t) {
  const int64_t dim = t.dim();
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t expected = 1;
  if (sizes[1] != 1 && strides[1] != expected) return false;
  expected *= sizes[1];
  for (int64_t d = dim - 1; d >= 2; --d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return sizes[0] == 1 || strides[0] == expected;
}
}  // namespace

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ", ref.device(),
              " and ", t.device(), "! (fastbn: ", name, " is on ", t.device(), ", ", ref_name, " on ", ref.device(),
              ")");
}

void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.defined(), "fastbn: input is undefined");
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_dtype(input.scalar_type()), "\"batch_norm\" not implemented for '",
                              at::toString(input.scalar_type()), "'");
  TORCH_CHECK_VALUE(input.dim() >= 2, "fastbn: expected input of shape (N, C, ...) with at least 2 dimensions, got ",
                    input.dim(), "D input");
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_eps(double eps, bool training) {
  if (training) {
    TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  } else {
    TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
  }
}

void check_train_count(const at::Tensor& input) {
  int64_t m = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) m *= input.size(d);
  TORCH_CHECK_VALUE(m != 1, "Expected more than 1 value per channel when training, got input size ", input.sizes());
}

at::Tensor channel_param(const at::Tensor& t, const char* name, const at::Tensor& input, int64_t channels) {
  TORCH_CHECK(t.defined(), "fastbn: ", name, " is undefined");
  check_same_device(t, name, input);
  TORCH_CHECK(t.numel() == channels, name, " should contain ", channels, " elements not ", t.numel());
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  if (t.dim() == 1 && t.scalar_type() == acc && t.is_contiguous()) return t;  // the common case: no copy
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == acc, "fastbn: expected ", name,
              " to have dtype ", at::toString(input.scalar_type()),
              (acc != input.scalar_type() ? std::string(" or ") + at::toString(acc) : std::string()),
              " (the input's dtype or its accumulation dtype), but got ", at::toString(t.scalar_type()));
  return t.reshape({channels}).to(acc).contiguous();
}

at::Tensor channel_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                         int64_t channels) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return channel_param(*t, name, input, channels);
}

at::Tensor like_input(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                      const at::Tensor& x, const Geometry& g) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const at::Tensor& v = *t;
  check_same_device(v, name, input);
  TORCH_CHECK(v.sizes() == input.sizes(), "fastbn: ", name, " has shape ", v.sizes(), " but input has shape ",
              input.sizes());
  TORCH_CHECK(v.scalar_type() == input.scalar_type(), "fastbn: ", name, " has dtype ", at::toString(v.scalar_type()),
              " but input has dtype ", at::toString(input.scalar_type()));
  const bool same = g.channels_last ? is_channels_last_dense(v) : v.is_contiguous();
  if (same) return v;
  at::Tensor out = empty_like_canonical(x);
  out.copy_(v);
  return out;
}

std::pair<at::Tensor, Geometry> canonical_input(const at::Tensor& input) {
  Geometry g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  at::Tensor x = input;
  if (g.S == 1 || input.dim() == 2) {
    // (N, C) or (N, C, 1, ..): rows of C values when dense, whichever way it is flagged.
    if (!(input.is_contiguous() || is_channels_last_dense(input))) x = input.contiguous();
    g.channels_last = true;
  } else if (input.is_contiguous()) {
    g.channels_last = false;
  } else if (is_channels_last_dense(input)) {
    g.channels_last = true;
  } else {
    x = input.contiguous();
    g.channels_last = false;
  }
  return {x, g};
}

at::Tensor empty_like_canonical(const at::Tensor& x) { return at::empty_strided(x.sizes(), x.strides(), x.options()); }

}  // namespace fastbn
