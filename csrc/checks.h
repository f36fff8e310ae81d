// Input checks and layout canonicalisation shared by every op implementation (defined in
// ops.cpp). Every check runs before any output is written or any state is mutated, and
// speaks PyTorch's wording where PyTorch has one.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>

#include "bn_types.h"

namespace fastbn {

// input: >= 2 dims, floating dtype (float, double, half, bfloat16).
void check_input(const at::Tensor& input);

// t on ref's device (PyTorch's message, then which tensors: `name` and `ref_name`).
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name = "input");

// Accumulation dtype for an input dtype: float for half/bfloat16/float, double for double.
at::ScalarType acc_dtype(at::ScalarType input_dtype);

// eps checks: training needs eps > 0, evaluation eps >= 0 (ValueError, PyTorch's message).
void check_eps(double eps, bool training);

// Training needs more than one value per channel (ValueError, PyTorch's message).
void check_train_count(const at::Tensor& input);

// A per-channel tensor (weight, bias, running_mean, running_var, save_mean, ...): on the
// input's device, `channels` elements, dtype the input's or its accumulation dtype.
// Returns it as a contiguous accumulation-dtype 1-D tensor, or undefined if absent.
at::Tensor channel_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                         int64_t channels);
at::Tensor channel_param(const at::Tensor& t, const char* name, const at::Tensor& input, int64_t channels);

// A tensor that must match the input elementwise (grad_out, residual): same shape, dtype
// and device. Returns it in `x`'s memory layout (copying only if its layout differs), or
// undefined if absent.
at::Tensor like_input(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                      const at::Tensor& x, const Geometry& g);

// The input in a layout the kernels take (NCHW-contiguous, or channels-last dense incl.
// contiguous (N, C)), copying only when it is in neither, and its geometry.
std::pair<at::Tensor, Geometry> canonical_input(const at::Tensor& input);

// Output allocation in the canonical input's layout.
at::Tensor empty_like_canonical(const at::Tensor& x);

}  // namespace fastbn
