// Tensor -> kernel plumbing shared by the CPU and CUDA backends: storage types for the
// kernels (c10::Half -> f16, c10::BFloat16 -> bf16), raw pointers of optional tensors, and
// the dtype dispatch every backend entry point uses.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "bn_types.h"

namespace fastbn {

template <class T> struct Storage { using type = T; };
template <> struct Storage<at::Half> { using type = f16; };
template <> struct Storage<at::BFloat16> { using type = bf16; };

// Data pointer of a tensor as T (null for an undefined tensor).
template <class T> const T* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}
template <class T> T* mptr(const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; }

}  // namespace fastbn

// Runs the block with T = the kernels' storage type of DTYPE (float, double, f16, bf16) and
// Acc = its accumulation type.
#define FASTBN_DISPATCH(DTYPE, NAME, ...)                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, NAME, [&] {  \
    using T = typename ::fastbn::Storage<scalar_t>::type;                       \
    using Acc = ::fastbn::acc_t<T>;                                             \
    (void)sizeof(Acc);                                                          \
    __VA_ARGS__                                                                 \
  })
