// Table of the single-threaded CPU kernels for one storage type, picked at run time for the
// best instruction set this CPU has (AVX-512, AVX2+FMA+F16C, else baseline x86-64).
// Torch-free; the threading driver (bn_cpu.cpp) calls through it. Shapes and contracts:
// kernels_impl.h.
#pragma once
#include <cstdint>

#include "../bn_math.h"

namespace fastbn {
namespace cpu {

// Planar run: nseg segments of len contiguous values of one channel, stride values apart.
// The table's run_* entries take it by reference: by value (24 bytes) it is copied through the
// stack, and the copy's 16-byte load waits for the caller's 8-byte stores (a store-forwarding
// stall on every call: 3-4% of the samples of a 7x7 bfloat16 forward).
struct Run {
  int64_t nseg, len, stride;
};

// Channels-last block: `rows` rows of C channel values, row r starting r * ld values after
// row 0 (ld == C: the tensor's rows; ld > C: a strip of C channels of wider rows, then
// C == L); L = lcm(C, lanes) is the pattern length, P = L / C rows a period.
struct Rows {
  int64_t rows, C, L, ld;
  int64_t periods() const { return rows / (L / C); }
  int64_t period_stride() const { return (L / C) * ld; }
};

template <class T> struct Kernels {
  using Acc = acc_t<T>;
  int lanes;  // values per vector; row patterns have length lcm(C, lanes)
  // Statistics and backward sums are merged in double (see kernels_impl.h); the elementwise
  // passes compute in Acc.
  // Statistics of the values minus a per-channel shift (bn_math.h stats_shift).
  WelfordState<double> (*run_stats)(const T* x, const Run& run, double shift);
  // The one-run elementwise passes take `stream` (non-temporal stores of the outputs, as below);
  // the caller then calls stream_fence once after its last run.
  void (*run_affine)(const T* x, T* y, const Run& run, FwdCoef<Acc> k, const T* r, bool relu, bool stream);
  void (*run_grad_sums)(const T* dy, const T* x, const Run& run, FwdCoef<Acc> k, const T* r, bool relu, double& sum_dy,
                        double& sum_dy_xmu);
  void (*run_grad_input)(const T* dy, const T* x, const Run& run, BwdCoef<Acc> g, FwdCoef<Acc> k, const T* r, bool relu,
                         bool stream, T* dx, T* dr);
  void (*stream_fence)();  // orders the calling thread's non-temporal stores before what follows
  // Elementwise passes over `planes` consecutive planes of S values, the first of channel c0
  // (plane j of channel (c0 + j) % C); k, g: per-channel coefficients [C]. These and the row
  // passes take `stream`: non-temporal stores of the outputs (bn_cpu.cpp stream_outputs).
  void (*planes_affine)(const T* x, T* y, int64_t planes, int64_t S, int64_t c0, int64_t C, const FwdCoef<Acc>* k,
                        const T* r, bool relu, bool stream);
  void (*planes_grad_input)(const T* dy, const T* x, int64_t planes, int64_t S, int64_t c0, int64_t C,
                            const BwdCoef<Acc>* g, const FwdCoef<Acc>* k, const T* r, bool relu, bool stream, T* dx,
                            T* dr);
  // stats_shift of channels [c0, c1) of rows of C values (count rows) into shift[0, c1 - c0).
  void (*rows_shifts)(const T* x, int64_t C, int64_t count, int64_t c0, int64_t c1, double* shift);
  // scratch: 2 * L doubles + 3 * L Acc (rows_stats), 6 * L doubles (rows_grad_sums). The row
  // elementwise passes also take `prefetch_x` / `prefetch`: software prefetch of their inputs
  // (x; x, dy and r), for inputs that are not in the cache (kernels_impl.h AheadInBlock); a
  // residual in rows_affine, never read by a reduction before it, is prefetched either way.
  void (*rows_stats)(const T* x, Rows R, const double* shift, double* mean, double* m2, double* scratch);
  void (*rows_affine)(const T* x, T* y, Rows R, const Acc* mean, const Acc* a, const Acc* b, const T* r, bool relu,
                      bool stream, bool prefetch_x);
  void (*rows_grad_sums)(const T* dy, const T* x, Rows R, const Acc* mean, const Acc* a, const Acc* b, const T* r,
                         bool relu, double* sum_dy, double* sum_dy_xmu, double* scratch);
  void (*rows_grad_input)(const T* dy, const T* x, Rows R, const Acc* mean, const Acc* A, const Acc* Bm,
                          const Acc* D, bool centred, const Acc* a, const Acc* b, const T* r, bool relu, bool stream,
                          bool prefetch, T* dx, T* dr);
};

// Defined in isa_base.cpp / isa_avx2.cpp / isa_avx512.cpp for T = float, double, f16, bf16, and
// in isa_avx512bf16.cpp for T = bf16 only (the other types have nothing to gain from it).
template <class T> const Kernels<T>& base_kernels();
template <class T> const Kernels<T>& avx2_kernels();
template <class T> const Kernels<T>& avx512_kernels();
template <class T> const Kernels<T>& avx512bf16_kernels();

// The table for this CPU: the best of AVX-512 with AVX512_BF16 (bfloat16 tensors; the others take
// the AVX-512 table), AVX-512 (AVX-512F/BW/VL with AVX2, FMA, F16C), AVX2 (AVX2, FMA, F16C) and
// the baseline it has, capped by the environment variable FASTBN_CPU_ISA (base, avx2, avx512
// or avx512bf16; read once).
template <class T> const Kernels<T>& kernels();
const char* isa_name();  // "avx512bf16", "avx512", "avx2" or "base"
// Size of the last-level cache in bytes (bn_cpu.cpp): a pass whose traffic exceeds it takes
// non-temporal stores.
int64_t last_level_cache_bytes();

}  // namespace cpu
}  // namespace fastbn
