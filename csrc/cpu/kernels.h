// Table of the single-threaded CPU kernels for one storage type, picked at run time for the
// best instruction set this CPU has (AVX2+FMA+F16C, else baseline x86-64). Torch-free; the
// threading driver (bn_cpu.cpp) calls through it. Shapes and contracts: kernels_impl.h.
#pragma once
#include <cstdint>

#include "../bn_math.h"

namespace fastbn {
namespace cpu {

// Planar run: nseg segments of len contiguous values of one channel, stride values apart.
struct Run {
  int64_t nseg, len, stride;
};

template <class T> struct Kernels {
  using Acc = acc_t<T>;
  int lanes;  // values per vector; row patterns have length lcm(C, lanes)
  // Statistics and backward sums are merged in double (see kernels_impl.h); the elementwise
  // passes compute in Acc.
  // Statistics of the values minus a per-channel shift (bn_math.h stats_shift).
  WelfordState<double> (*run_stats)(const T* x, Run run, double shift);
  void (*run_affine)(const T* x, T* y, Run run, FwdCoef<Acc> k, const T* r, bool relu);
  void (*run_grad_sums)(const T* dy, const T* x, Run run, FwdCoef<Acc> k, const T* r, bool relu, double& sum_dy,
                        double& sum_dy_xmu);
  void (*run_grad_input)(const T* dy, const T* x, Run run, BwdCoef<Acc> g, FwdCoef<Acc> k, const T* r, bool relu,
                         T* dx, T* dr);
  // scratch: 2 * L doubles + 3 * L Acc (rows_stats), 6 * L doubles (rows_grad_sums).
  void (*rows_stats)(const T* x, int64_t rows, int64_t C, int64_t L, const double* shift, double* mean, double* m2,
                     double* scratch);
  void (*rows_affine)(const T* x, T* y, int64_t rows, int64_t C, int64_t L, const Acc* mean, const Acc* a,
                      const Acc* b, const T* r, bool relu);
  void (*rows_grad_sums)(const T* dy, const T* x, int64_t rows, int64_t C, int64_t L, const Acc* mean, const Acc* a,
                         const Acc* b, const T* r, bool relu, double* sum_dy, double* sum_dy_xmu, double* scratch);
  void (*rows_grad_input)(const T* dy, const T* x, int64_t rows, int64_t C, int64_t L, const Acc* mean, const Acc* A,
                          const Acc* Bm, const Acc* D, bool centred, const Acc* a, const Acc* b, const T* r,
                          bool relu, T* dx,
                          T* dr);
};

// Defined in isa_base.cpp / isa_avx2.cpp for T = float, double, f16, bf16.
template <class T> const Kernels<T>& base_kernels();
template <class T> const Kernels<T>& avx2_kernels();

// The table for this CPU (AVX2 when the CPU has AVX2, FMA and F16C, unless the environment
// variable FASTBN_CPU_ISA=base asks for the baseline).
template <class T> const Kernels<T>& kernels();
const char* isa_name();

}  // namespace cpu
}  // namespace fastbn
