// The CUDA backend of the ops in op_impl.h: tensors -> raw pointers, device guard, current
// stream, dtype dispatch, workspace from PyTorch's allocator (no host sync, no other
// allocation: CUDA-graph capturable), and a check of every launch. Uses only generic ATen/c10
// APIs; the launch environment (stream, SM count) comes from cuda_env.h. Registered for the
// CUDA dispatch key in bn_cuda_binding.cpp; the CPU emulator (tests/cuda_emu) binds the same
// struct to CPU tensors.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>

#include "../dispatch.h"
#include "../op_impl.h"
#include "cuda_env.h"
#include "launch.h"

namespace fastbn {
namespace cuda {

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastbn: CUDA kernel launch failed in ", what, ": ", cudaGetErrorString(err));
}

template <class Acc> inline ChannelStats<Acc> channel_stats(const Operands& o) {
  ChannelStats<Acc> st;
  st.mean = cptr<Acc>(o.mean);
  st.scale_src = cptr<Acc>(o.scale_src);
  st.src_is_var = o.src_is_var;
  st.eps = static_cast<Acc>(o.eps);
  return st;
}
template <class Acc> inline Affine<Acc> affine(const Operands& o) { return Affine<Acc>{cptr<Acc>(o.weight), cptr<Acc>(o.bias)}; }

// Device workspace for one per-channel reduction over geometry g (caching allocator).
inline at::Tensor reduce_workspace(const Geometry& g, const at::Tensor& x, const LaunchEnv& env) {
  const size_t bytes = reduce_workspace_bytes(g, static_cast<int>(x.element_size()), env.sm_count);
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

struct CudaBackend {
  static void count_batch(at::Tensor& batches) { batches.add_(1); }
  static void batch_stats(const Geometry& g, const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
    c10::DeviceGuard guard(x.device());
    const LaunchEnv env = current_env();
    at::Tensor ws = reduce_workspace(g, x, env);
    FASTBN_DISPATCH(x.scalar_type(), "fastbn_cuda_batch_stats", {
      check_launch(launch_stats<T>(g, cptr<T>(x), mptr<Acc>(mean), mptr<Acc>(var), nullptr, 0.0, RunningStats<Acc>{},
                                   ws.data_ptr(), env),
                   "batch_stats");
    });
  }

  static void forward_train(const Operands& o, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd, at::Tensor& var,
                            const Running& run) {
    c10::DeviceGuard guard(o.x.device());
    const LaunchEnv env = current_env();
    at::Tensor ws = reduce_workspace(o.g, o.x, env);
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_cuda_forward_train", {
      check_launch(launch_stats<T>(o.g, cptr<T>(o.x), mptr<Acc>(mean), mptr<Acc>(var), mptr<Acc>(invstd), o.eps,
                                   run.view<Acc>(), ws.data_ptr(), env),
                   "forward_train (statistics)");
      const ChannelStats<Acc> st{mptr<Acc>(mean), mptr<Acc>(invstd), false, Acc(0)};
      check_launch(launch_normalize<T>(o.g, cptr<T>(o.x), mptr<T>(y), st, affine<Acc>(o), cptr<T>(o.residual), o.relu,
                                       env),
                   "forward_train (normalize)");
    });
  }

  static void normalize(const Operands& o, at::Tensor& y) {
    c10::DeviceGuard guard(o.x.device());
    const LaunchEnv env = current_env();
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_cuda_normalize", {
      check_launch(launch_normalize<T>(o.g, cptr<T>(o.x), mptr<T>(y), channel_stats<Acc>(o), affine<Acc>(o),
                                       cptr<T>(o.residual), o.relu, env),
                   "normalize");
    });
  }

  static void backward(const Operands& o, const at::Tensor& dy, bool training, bool sums, at::Tensor& sum_dy,
                       at::Tensor& sum_dy_xhat, at::Tensor& dx, at::Tensor& dr) {
    c10::DeviceGuard guard(o.x.device());
    const LaunchEnv env = current_env();
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_cuda_backward", {
      const ChannelStats<Acc> st = channel_stats<Acc>(o);
      const Affine<Acc> af = affine<Acc>(o);
      if (sums) {
        at::Tensor ws = reduce_workspace(o.g, o.x, env);
        check_launch(launch_grad_reduce<T>(o.g, cptr<T>(dy), cptr<T>(o.x), st, af, cptr<T>(o.residual), o.relu,
                                           mptr<Acc>(sum_dy), mptr<Acc>(sum_dy_xhat), ws.data_ptr(), env),
                     "backward (reduce)");
      }
      if (dx.defined() || dr.defined()) {
        check_launch(launch_grad_input<T>(o.g, cptr<T>(dy), cptr<T>(o.x), st, af, cptr<T>(o.residual), o.relu,
                                          training, sums ? cptr<Acc>(sum_dy) : nullptr,
                                          sums ? cptr<Acc>(sum_dy_xhat) : nullptr, o.g.count(), nullptr,
                                          mptr<T>(dx), mptr<T>(dr), env),
                     "backward (grad_input)");
      }
    });
  }

  static void grad_input(const Operands& o, const at::Tensor& dy, const at::Tensor& sum_dy,
                         const at::Tensor& sum_dy_xhat, const at::Tensor& count, at::Tensor& dx, at::Tensor& dr) {
    c10::DeviceGuard guard(o.x.device());
    const LaunchEnv env = current_env();
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_cuda_grad_input", {
      check_launch(launch_grad_input<T>(o.g, cptr<T>(dy), cptr<T>(o.x), channel_stats<Acc>(o), affine<Acc>(o),
                                        cptr<T>(o.residual), o.relu, /*training=*/true, cptr<Acc>(sum_dy),
                                        cptr<Acc>(sum_dy_xhat), 0, cptr<int64_t>(count), mptr<T>(dx), mptr<T>(dr),
                                        env),
                   "backward_elemt");
    });
  }

  static void merge_stats(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& vars, double eps,
                          at::Tensor& mean, at::Tensor& invstd, at::Tensor& var, at::Tensor& total,
                          const Running& run) {
    c10::DeviceGuard guard(means.device());
    const LaunchEnv env = current_env();
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "fastbn_cuda_merge_stats", [&] {
      check_launch(launch_merge_stats<scalar_t>(cptr<int64_t>(counts), cptr<scalar_t>(means), cptr<scalar_t>(vars),
                                                means.size(0), means.size(1), eps, mptr<scalar_t>(mean),
                                                mptr<scalar_t>(invstd), mptr<scalar_t>(var), mptr<int64_t>(total),
                                                run.view<scalar_t>(), env),
                   "merge_stats");
    });
  }
};

}  // namespace cuda
}  // namespace fastbn
