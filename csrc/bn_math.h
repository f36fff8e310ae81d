// The maths every fastbn kernel computes, shared by CPU (C++) and CUDA (nvcc).
// Torch-free: include it from .cu files and from the CPU ISA units alike.
//
//   mean   = (1/m) sum x            var_b = (1/m) sum (x - mean)^2      invstd = 1/sqrt(var_b + eps)
//   y      = (x - mean) * a + b     a = invstd * w                       (optionally + residual, relu)
//   dx     = A * dy + Bm * (x - mean) + D    with
//            A = w * invstd,  Bm = -A * invstd * sum(dy * xhat) / m,  D = -A * sum(dy) / m   (training)
//            A = w * invstd,  Bm = 0,  D = 0                                                  (eval)
//   running_mean = (1 - f) * running_mean + f * mean
//   running_var  = (1 - f) * running_var  + f * var_b * m / (m - 1)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bn_types.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTBN_HD __host__ __device__ __forceinline__
#define FASTBN_HD_MEMBER __host__ __device__ __forceinline__
#else
#define FASTBN_HD_MEMBER inline __attribute__((always_inline))
// always_inline: the templates below are compiled where they are instantiated, inside the CPU
// ISA units' target regions (cpu/isa_avx2.cpp), so that their vector operations inline.
// static: each translation unit has its own copy (see madd: FASTBN_HOST_FMA is per unit).
#define FASTBN_HD static inline __attribute__((always_inline))
#endif

namespace fastbn {

// ---------------------------------------------------------------- conversions
FASTBN_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
FASTBN_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// IEEE half -> float, exact (incl. subnormals, inf, NaN).
FASTBN_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized);
  return f32_from_bits(sign | bits);
#endif
}

// float -> IEEE half, round to nearest even (overflow to inf, NaN stays NaN).
FASTBN_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

FASTBN_HD float bf16_bits_to_float(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even, NaN -> quiet NaN 0x7FC0 (same as c10::BFloat16).
// On CUDA the hardware conversion (cvt.rn.bf16.f32: the same rounding, subnormals kept).
FASTBN_HD uint16_t float_to_bf16_bits(float f) {
  if (f != f) return 0x7FC0u;
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = f32_bits(f);
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
#endif
}

// Load a storage value as its accumulation type / store an accumulation value.
FASTBN_HD float to_acc(float v) { return v; }
FASTBN_HD double to_acc(double v) { return v; }
FASTBN_HD float to_acc(f16 v) { return half_bits_to_float(v.bits); }
FASTBN_HD float to_acc(bf16 v) { return bf16_bits_to_float(v.bits); }

template <class T> struct from_acc_impl;
template <> struct from_acc_impl<float> { FASTBN_HD_MEMBER static float get(float v) { return v; } };
template <> struct from_acc_impl<double> { FASTBN_HD_MEMBER static double get(double v) { return v; } };
template <> struct from_acc_impl<f16> {
  FASTBN_HD_MEMBER static f16 get(float v) { return f16{float_to_half_bits(v)}; }
};
template <> struct from_acc_impl<bf16> {
  FASTBN_HD_MEMBER static bf16 get(float v) { return bf16{float_to_bf16_bits(v)}; }
};
template <class T, class Acc> FASTBN_HD T from_acc(Acc v) { return from_acc_impl<T>::get(v); }

// ---------------------------------------------------------------- value types
// Every formula below is written once for a value type V: a scalar (float, double; CPU and
// CUDA) or a CPU vector of lanes (cpu/vec.h: Vec<float>, Vec<double>), which provides
// V::set1(s), +, -, *, / and the free functions madd, where_finite, relu_value and
// where_positive (found by argument-dependent lookup). Per-lane results equal the scalar ones.

// Scalar s as a V (every lane s).
template <class V, class S> FASTBN_HD V splat(S s) {
  if constexpr (std::is_arithmetic<V>::value) {
    return static_cast<V>(s);
  } else {
    return V::set1(s);
  }
}

// x * a + b: fused (one rounding) where the instruction set has FMA, which is on CUDA and in
// the CPU units that define FASTBN_HOST_FMA before including this header (cpu/isa_avx2.cpp,
// whose vectors fuse too: cpu/vec.h); elsewhere (the baseline CPU unit, the CPU driver) a
// multiply and an add, as a software FMA would cost a call per value. One unit's scalar
// and vector code round alike.
FASTBN_HD float madd(float x, float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaf(x, a, b);
#elif defined(FASTBN_HOST_FMA)
  return __builtin_fmaf(x, a, b);
#else
  return x * a + b;
#endif
}
FASTBN_HD double madd(double x, double a, double b) {
#if defined(__CUDA_ARCH__)
  return fma(x, a, b);
#elif defined(FASTBN_HOST_FMA)
  return __builtin_fma(x, a, b);
#else
  return x * a + b;
#endif
}
template <class S> FASTBN_HD bool is_finite(S v) { return v - v == v - v; }
// a where d is finite, else b.
FASTBN_HD float where_finite(float d, float a, float b) { return is_finite(d) ? a : b; }
FASTBN_HD double where_finite(double d, double a, double b) { return is_finite(d) ? a : b; }
// max(v, 0) with NaN kept (torch.relu's semantics).
FASTBN_HD float relu_value(float v) { return v < 0.0f ? 0.0f : v; }
FASTBN_HD double relu_value(double v) { return v < 0.0 ? 0.0 : v; }
// v where pre > 0, else 0 (relu's gradient; NaN pre gives 0).
FASTBN_HD float where_positive(float pre, float v) { return pre > 0.0f ? v : 0.0f; }
FASTBN_HD double where_positive(double pre, double v) { return pre > 0.0 ? v : 0.0; }

FASTBN_HD float rsqrt_acc(float v) {
#if defined(__CUDA_ARCH__)
  return 1.0f / sqrtf(v);  // IEEE sqrt + division: matches the CPU to the last bit
#else
  return 1.0f / std::sqrt(v);
#endif
}
FASTBN_HD double rsqrt_acc(double v) {
#if defined(__CUDA_ARCH__)
  return 1.0 / sqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// ---------------------------------------------------------------- Welford / Chan
// Statistics of a set of values: count, mean and M2 = sum (x - mean)^2.
template <class Acc> struct WelfordState {
  int64_t n;
  Acc mean;
  Acc m2;
};

// Weights of Chan's merge of a part of nb values into one of na values (n = na + nb > 0).
template <class S> struct ChanWeights {
  S ratio;  // nb / n
  S keep;   // na / n
  S cross;  // na * nb / n
};
template <class S> FASTBN_HD ChanWeights<S> chan_weights(int64_t na, int64_t nb) {
  const S inv = S(1) / static_cast<S>(na + nb);
  return ChanWeights<S>{static_cast<S>(nb) * inv, static_cast<S>(na) * inv,
                        static_cast<S>(na) * (static_cast<S>(nb) * inv)};
}

// Chan's parallel merge, the one formula every statistics path uses: (mean, m2) of na values
// absorbs (bmean, bm2) of nb values (na > 0, nb > 0; weights chan_weights(na, nb)). Never
// forms E[x^2] - E[x]^2. Non-finite values give exactly what the plain formulas mean = sum / n,
// m2 = sum (x - mean)^2 give (PyTorch's): mean +inf for +inf values, NaN for NaN or for both
// infinities, and m2 NaN whenever the mean is not finite. With kExact false (the CPU's
// inner lane merges, whose non-finite results the driver recomputes value by value:
// cpu/bn_cpu.cpp exact_channel) a non-finite input still gives a non-finite result, but not
// necessarily that one.
template <bool kExact = true, class V, class S>
FASTBN_HD void chan_absorb(V& mean, V& m2, const V& bmean, const V& bm2, const ChanWeights<S>& w) {
  const V delta = bmean - mean;
  const V ratio = splat<V>(w.ratio);
  const V near = madd(delta, ratio, mean);
  const V spread = madd(delta * delta, splat<V>(w.cross), m2 + bm2);
  if constexpr (kExact) {
    const V weighted = madd(mean, splat<V>(w.keep), bmean * ratio);  // right where delta is not finite
    mean = where_finite(delta, near, weighted);
    m2 = spread + (delta - delta);  // + NaN for non-finite delta
  } else {
    mean = near;
    m2 = spread;
  }
}

// Merge of two states (either may be empty).
template <class Acc>
FASTBN_HD WelfordState<Acc> chan_merge(const WelfordState<Acc>& a, const WelfordState<Acc>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  WelfordState<Acc> r = a;
  chan_absorb(r.mean, r.m2, b.mean, b.m2, chan_weights<Acc>(a.n, b.n));
  r.n = a.n + b.n;
  return r;
}

// The state of one value: {1, v, 0}, with M2 NaN for an infinite v (the plain formula's (v - v)^2).
template <class Acc> FASTBN_HD WelfordState<Acc> single_state(Acc v) {
  return WelfordState<Acc>{1, v, (v - v) * (v - v)};
}

// Welford update of a state with one value (a merge with single_state(v)).
template <class Acc> FASTBN_HD void welford_add(WelfordState<Acc>& s, Acc v) { s = chan_merge(s, single_state(v)); }

// Balanced-tree sums of N >= 1 terms: N - 1 additions at depth ceil(log2 N), so independent
// ones overlap (the left-to-right sum is a chain of N - 1 dependent additions); never less
// accurate than that sum. tree_sum: t[0] + ... + t[N - 1]; tree_sum_sq: t[0]^2 + ... + t[N - 1]^2.
template <int N, class V> FASTBN_HD V tree_sum(const V* t) {
  if constexpr (N == 1) {
    return t[0];
  } else {
    return tree_sum<N / 2>(t) + tree_sum<N - N / 2>(t + N / 2);
  }
}
template <int N, class V> FASTBN_HD V tree_sum_sq(const V* t) {
  if constexpr (N == 1) {
    return t[0] * t[0];
  } else if constexpr (N == 2) {
    return madd(t[0], t[0], t[1] * t[1]);
  } else {
    return tree_sum_sq<N / 2>(t) + tree_sum_sq<N - N / 2>(t + N / 2);
  }
}

// Two-pass statistics of K >= 1 values: their mean (one rounding of the sum / K), then the
// centred squares m2 and the residual sum (v - mean), which is minus K times the mean's
// rounding error (a caller merging in a wider type corrects with it: mean + residual / K,
// m2 - residual^2 / K). Every sum is a tree_sum.
template <int K, class V> FASTBN_HD void block_stats(const V* v, V& mean, V& m2, V& residual) {
  V t[K];
  if constexpr ((K & (K - 1)) == 0) {
    // Each value times the exact reciprocal 1 / K, then the sum: the roundings of sum / K,
    // without a division, and no overflow where the values are near the float range.
    const V inv = splat<V>(1.0 / K);
    for (int i = 0; i < K; ++i) t[i] = v[i] * inv;
    mean = tree_sum<K>(t);
  } else {
    mean = tree_sum<K>(v) / splat<V>(K);
  }
  for (int i = 0; i < K; ++i) t[i] = v[i] - mean;
  residual = tree_sum<K>(t);
  m2 = tree_sum_sq<K>(t);
}
template <int K, class V> FASTBN_HD void block_stats(const V* v, V& mean, V& m2) {
  V residual;
  block_stats<K>(v, mean, m2, residual);
}

// Statistics are accumulated over x - shift, with one shift per channel, and the mean is
// shift + the mean of the shifted values (add_shift). Float accumulation rounds at the scale
// of |mean - shift|: a large common offset would cost digits (and Chan's merge of means
// rounded at the offset's scale an error of the first order in M2), and a shift far from a
// mean near 0 would cost them too. The shift comes from the channel's first K =
// min(kShiftSamples, count) values in memory order (load(j): value j): their mean m where |m|
// exceeds their largest distance from it (an offset that dominates the spread: m is then
// within about spread / sqrt(K) of the mean), else 0; 0 also when m is not finite.
constexpr int kShiftSamples = 8;
// The shift from the samples' mean m and their largest distance from it.
template <class Acc> FASTBN_HD Acc shift_from(Acc m, Acc spread) {
  const Acc am = std::fabs(m);  // fabs, not a branch on the sign: the same compare results
  return m - m == Acc(0) && am > spread ? m : Acc(0);
}
// The samples' largest distance from their mean m so far, with sample v.
template <class Acc> FASTBN_HD Acc shift_spread(Acc spread, Acc v, Acc m) {
  const Acc ad = std::fabs(v - m);
  return ad > spread ? ad : spread;
}
// The shifts of L channels at once: load(j, v) sets v[l] to value j of channel l (called twice
// per j: for the mean, then for the spread). Each channel's arithmetic is the one-channel
// stats_shift's, in the same order, so both give the same bits.
template <int L, class Acc, class Load> FASTBN_HD void stats_shifts(int64_t count, const Load& load, Acc (&shift)[L]) {
  const int K = count < kShiftSamples ? static_cast<int>(count) : kShiftSamples;
  Acc spread[L], v[L];
  for (int l = 0; l < L; ++l) shift[l] = spread[l] = Acc(0);
  if (K <= 0) return;
  for (int j = 0; j < K; ++j) {
    load(j, v);
    for (int l = 0; l < L; ++l) shift[l] = shift[l] + v[l];
  }
  for (int l = 0; l < L; ++l) shift[l] = shift[l] / static_cast<Acc>(K);  // the samples' mean m
  for (int j = 0; j < K; ++j) {
    load(j, v);
    for (int l = 0; l < L; ++l) spread[l] = shift_spread(spread[l], v[l], shift[l]);
  }
  for (int l = 0; l < L; ++l) shift[l] = shift_from(shift[l], spread[l]);
}
// One channel's shift; load(j): its value j.
template <class Acc, class Load> FASTBN_HD Acc stats_shift(int64_t count, const Load& load) {
  Acc shift[1];
  stats_shifts<1>(count, [&](int j, Acc (&v)[1]) { v[0] = static_cast<Acc>(load(j)); }, shift);
  return shift[0];
}
// Offset of value j of a channel from its first value in an (N, C, S) tensor: planar, or
// channels-last as S = 1 (rows of C values).
// j < kShiftSamples (32-bit division: a 64-bit one is a called subroutine on CUDA).
FASTBN_HD int64_t channel_value_offset(int j, int64_t C, int64_t S) {
  if (j < S) return j;  // no division within the first plane
  const int s = static_cast<int>(S);  // S <= j here
  return static_cast<int64_t>(j / s) * (C * S) + j % s;
}
template <class F> FASTBN_HD void add_shift(WelfordState<F>& s, F shift) { s.mean = s.mean + shift; }

// Biased variance of a merged state; 0 for an empty state.
template <class Acc> FASTBN_HD Acc biased_var(const WelfordState<Acc>& s) {
  return s.n > 0 ? s.m2 / static_cast<Acc>(s.n) : Acc(0);
}

template <class Acc> FASTBN_HD Acc invstd_from_var(Acc var, Acc eps) { return rsqrt_acc(var + eps); }

// The state of a rank's (count n, mean, biased variance) in a cross-rank merge.
template <class F, class Acc> FASTBN_HD WelfordState<F> rank_state(int64_t n, Acc mean, Acc var) {
  return WelfordState<F>{n, static_cast<F>(mean), static_cast<F>(var) * static_cast<F>(n)};
}

// Channel c's outputs of a merged state: mean, biased variance and (when invstd is not
// null) 1 / sqrt(var + eps), each rounded to Acc.
template <class Acc, class F>
FASTBN_HD void finalize_stats(const WelfordState<F>& s, Acc eps, Acc* mean, Acc* var, Acc* invstd, int64_t c) {
  const Acc v = static_cast<Acc>(biased_var(s));
  mean[c] = static_cast<Acc>(s.mean);
  var[c] = v;
  if (invstd) invstd[c] = invstd_from_var(v, eps);
}

template <class Acc> FASTBN_HD Acc channel_invstd(const ChannelStats<Acc>& st, int64_t c) {
  return st.src_is_var ? invstd_from_var(st.scale_src[c], st.eps) : st.scale_src[c];
}

// Channel c's backward sums from their merged totals (F: the merge type): sum dy, and
// sum dy * (x - mean) scaled by invstd to sum dy * xhat.
template <class Acc, class F>
FASTBN_HD void finalize_grad_sums(F sum_dy_total, F sum_dy_xmu_total, const ChannelStats<Acc>& st, int64_t c,
                                  Acc* sum_dy, Acc* sum_dy_xhat) {
  sum_dy[c] = static_cast<Acc>(sum_dy_total);
  sum_dy_xhat[c] = static_cast<Acc>(sum_dy_xmu_total * static_cast<F>(channel_invstd(st, c)));
}

// ---------------------------------------------------------------- forward
// y = act((x - mean) * a + b + residual), a = invstd * w, b = bias.
template <class V> struct FwdCoef {
  V mean, a, b;
};

template <class Acc>
FASTBN_HD FwdCoef<Acc> forward_coef(const ChannelStats<Acc>& st, const Affine<Acc>& af, int64_t c) {
  const Acc invstd = channel_invstd(st, c);
  FwdCoef<Acc> k;
  k.mean = st.mean[c];
  k.a = af.weight ? invstd * af.weight[c] : invstd;
  k.b = af.bias ? af.bias[c] : Acc(0);
  return k;
}

// A scalar coefficient set in every lane of V.
template <class V, class Acc> FASTBN_HD FwdCoef<V> splat_coef(const FwdCoef<Acc>& k) {
  return FwdCoef<V>{splat<V>(k.mean), splat<V>(k.a), splat<V>(k.b)};
}

// Pre-activation value (x - mean) * a + b [+ r]: the forward's output before the relu, and
// what the backward recomputes for the relu mask. r is read only when has_r.
template <class V> FASTBN_HD V pre_activation(V x, const FwdCoef<V>& k, V r, bool has_r) {
  const V t = madd(x - k.mean, k.a, k.b);
  return has_r ? t + r : t;
}

// The forward's output value.
template <class V> FASTBN_HD V forward_value(V x, const FwdCoef<V>& k, V r, bool has_r, bool relu) {
  const V t = pre_activation(x, k, r, has_r);
  return relu ? relu_value(t) : t;
}

// The gradient that reaches the normalisation: dy, masked by the relu of the recomputed
// pre-activation when the forward had one.
template <class V> FASTBN_HD V effective_dy(V dy, V x, const FwdCoef<V>& k, V r, bool has_r, bool relu) {
  return relu ? where_positive(pre_activation(x, k, r, has_r), dy) : dy;
}

// ---------------------------------------------------------------- backward
// One value's terms of the backward sums: s1 += dy_eff, s2 += dy_eff * (x - mean).
template <class V> FASTBN_HD void grad_sums_add(V& s1, V& s2, V dy_eff, V x, V mean) {
  s1 = s1 + dy_eff;
  s2 = madd(dy_eff, x - mean, s2);
}

// dx = A * dy + Bm * (x - mean) + D when `centred` (training: the statistics depend on x),
// else dx = A * dy (evaluation: x does not enter, so an infinite x leaves dx finite).
template <class V> struct BwdCoef {
  V mean, A, Bm, D;
  bool centred;
};

// sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd, over the `count` values.
template <class Acc>
FASTBN_HD BwdCoef<Acc> backward_coef(const ChannelStats<Acc>& st, const Affine<Acc>& af, int64_t c, bool training,
                                     Acc sum_dy, Acc sum_dy_xhat, int64_t count) {
  const Acc invstd = channel_invstd(st, c);
  BwdCoef<Acc> k;
  k.mean = st.mean[c];
  k.A = af.weight ? af.weight[c] * invstd : invstd;
  k.centred = training && count > 0;
  if (k.centred) {
    const Acc inv_m = Acc(1) / static_cast<Acc>(count);
    k.Bm = -k.A * invstd * sum_dy_xhat * inv_m;
    k.D = -k.A * sum_dy * inv_m;
  } else {
    k.Bm = Acc(0);
    k.D = Acc(0);
  }
  return k;
}

template <class V, class Acc> FASTBN_HD BwdCoef<V> splat_coef(const BwdCoef<Acc>& k) {
  return BwdCoef<V>{splat<V>(k.mean), splat<V>(k.A), splat<V>(k.Bm), splat<V>(k.D), k.centred};
}

// dx of one value, from its effective upstream gradient.
template <class V> FASTBN_HD V grad_input(V dy, V x, const BwdCoef<V>& k) {
  return k.centred ? madd(dy, k.A, madd(x - k.mean, k.Bm, k.D)) : dy * k.A;
}

// ---------------------------------------------------------------- running statistics
// PyTorch's convention: new = (1 - f) * old + f * batch, variance unbiased (m / (m - 1)).
// `count` > 0 (a count of 1, possible only across SyncBatchNorm's ranks, gives an infinite or
// NaN running variance, as in PyTorch).
template <class Acc>
FASTBN_HD void running_update(Acc& running_mean, Acc& running_var, Acc mean, Acc var_biased, Acc momentum,
                              int64_t count) {
  const Acc unbiased = var_biased * (static_cast<Acc>(count) / static_cast<Acc>(count - 1));
  running_mean = madd(momentum, mean, (Acc(1) - momentum) * running_mean);
  running_var = madd(momentum, unbiased, (Acc(1) - momentum) * running_var);
}

// The factor of a running-statistics update (see RunningStats); 1 / batches is taken in
// double and rounded once, as PyTorch's 1.0 / float(num_batches_tracked) is.
template <class Acc> FASTBN_HD Acc running_factor(const RunningStats<Acc>& r) {
  return static_cast<Acc>(r.batches ? 1.0 / static_cast<double>(*r.batches) : r.momentum);
}

// Channel c's running statistics after a batch of `count` values per channel with the given
// mean and biased variance; no update when r has none or count == 0.
template <class Acc>
FASTBN_HD void update_running(const RunningStats<Acc>& r, int64_t c, Acc mean, Acc var_biased, int64_t count) {
  if (r.mean == nullptr || count == 0) return;
  running_update(r.mean[c], r.var[c], mean, var_biased, running_factor(r), count);
}

}  // namespace fastbn
