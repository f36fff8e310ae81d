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

#include "bn_types.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTBN_HD __host__ __device__ __forceinline__
#else
#define FASTBN_HD inline
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

// float -> bfloat16, round to nearest even, NaN -> quiet NaN (same as c10::BFloat16).
FASTBN_HD uint16_t float_to_bf16_bits(float f) {
  if (f != f) return 0x7FC0u;
  const uint32_t u = f32_bits(f);
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

// Load a storage value as its accumulation type / store an accumulation value.
FASTBN_HD float to_acc(float v) { return v; }
FASTBN_HD double to_acc(double v) { return v; }
FASTBN_HD float to_acc(f16 v) { return half_bits_to_float(v.bits); }
FASTBN_HD float to_acc(bf16 v) { return bf16_bits_to_float(v.bits); }

template <class T> struct from_acc_impl;
template <> struct from_acc_impl<float> { FASTBN_HD static float get(float v) { return v; } };
template <> struct from_acc_impl<double> { FASTBN_HD static double get(double v) { return v; } };
template <> struct from_acc_impl<f16> {
  FASTBN_HD static f16 get(float v) { return f16{float_to_half_bits(v)}; }
};
template <> struct from_acc_impl<bf16> {
  FASTBN_HD static bf16 get(float v) { return bf16{float_to_bf16_bits(v)}; }
};
template <class T, class Acc> FASTBN_HD T from_acc(Acc v) { return from_acc_impl<T>::get(v); }

// ---------------------------------------------------------------- scalar helpers
FASTBN_HD float madd(float x, float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaf(x, a, b);
#else
  return x * a + b;
#endif
}
FASTBN_HD double madd(double x, double a, double b) {
#if defined(__CUDA_ARCH__)
  return fma(x, a, b);
#else
  return x * a + b;
#endif
}
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
template <class Acc> FASTBN_HD bool is_finite(Acc v) { return v - v == v - v; }

// ---------------------------------------------------------------- Welford / Chan
// Statistics of a set of values: count, mean and M2 = sum (x - mean)^2.
template <class Acc> struct WelfordState {
  int64_t n;
  Acc mean;
  Acc m2;
};

// Chan's parallel merge of two partial states (either may be empty). Exact in the sense of
// never forming E[x^2] - E[x]^2. Infinities propagate as a plain mean would (inf, or NaN
// for inf - inf) instead of turning into NaN through the delta form.
template <class Acc>
FASTBN_HD WelfordState<Acc> chan_merge(const WelfordState<Acc>& a, const WelfordState<Acc>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const Acc nb_over_n = static_cast<Acc>(b.n) / static_cast<Acc>(n);
  const Acc delta = b.mean - a.mean;
  WelfordState<Acc> r;
  r.n = n;
  if (is_finite(delta)) {
    r.mean = madd(delta, nb_over_n, a.mean);
  } else {
    r.mean = (a.mean * static_cast<Acc>(a.n) + b.mean * static_cast<Acc>(b.n)) / static_cast<Acc>(n);
  }
  r.m2 = a.m2 + b.m2 + delta * delta * static_cast<Acc>(a.n) * nb_over_n;
  return r;
}

// Welford update of a state with one value.
template <class Acc> FASTBN_HD void welford_add(WelfordState<Acc>& s, Acc v) {
  s.n += 1;
  const Acc d = v - s.mean;
  s.mean += d / static_cast<Acc>(s.n);
  s.m2 = madd(d, v - s.mean, s.m2);
}

// Biased variance of a merged state; 0 for an empty state.
template <class Acc> FASTBN_HD Acc biased_var(const WelfordState<Acc>& s) {
  return s.n > 0 ? s.m2 / static_cast<Acc>(s.n) : Acc(0);
}

template <class Acc> FASTBN_HD Acc invstd_from_var(Acc var, Acc eps) { return rsqrt_acc(var + eps); }

template <class Acc> FASTBN_HD Acc channel_invstd(const ChannelStats<Acc>& st, int64_t c) {
  return st.src_is_var ? invstd_from_var(st.scale_src[c], st.eps) : st.scale_src[c];
}

// ---------------------------------------------------------------- forward coefficients
// y = (x - mean) * a + b (+ residual) (relu).  a = invstd * w, b = bias.
template <class Acc> struct FwdCoef {
  Acc mean, a, b;
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

// Pre-activation value; the relu mask in backward is recomputed with this same function.
template <class Acc> FASTBN_HD Acc pre_activation(Acc x, const FwdCoef<Acc>& k) { return madd(x - k.mean, k.a, k.b); }

// ---------------------------------------------------------------- backward coefficients
// dx = A * dy + Bm * (x - mean) + D.
template <class Acc> struct BwdCoef {
  Acc mean, A, Bm, D;
};

// sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd, over the `count` values.
template <class Acc>
FASTBN_HD BwdCoef<Acc> backward_coef(const ChannelStats<Acc>& st, const Affine<Acc>& af, int64_t c, bool training,
                                     Acc sum_dy, Acc sum_dy_xhat, int64_t count) {
  const Acc invstd = channel_invstd(st, c);
  BwdCoef<Acc> k;
  k.mean = st.mean[c];
  k.A = af.weight ? af.weight[c] * invstd : invstd;
  if (training && count > 0) {
    const Acc inv_m = Acc(1) / static_cast<Acc>(count);
    k.Bm = -k.A * invstd * sum_dy_xhat * inv_m;
    k.D = -k.A * sum_dy * inv_m;
  } else {
    k.Bm = Acc(0);
    k.D = Acc(0);
  }
  return k;
}

template <class Acc> FASTBN_HD Acc grad_input(Acc dy, Acc x, const BwdCoef<Acc>& k) {
  return madd(dy, k.A, madd(x - k.mean, k.Bm, k.D));
}

// ---------------------------------------------------------------- running statistics
// PyTorch's convention: new = (1 - f) * old + f * batch, variance unbiased (m / (m - 1)).
// `count` >= 2 (the caller skips the update for count == 0).
template <class Acc>
FASTBN_HD void running_update(Acc& running_mean, Acc& running_var, Acc mean, Acc var_biased, Acc momentum,
                              int64_t count) {
  const Acc unbiased = var_biased * (static_cast<Acc>(count) / static_cast<Acc>(count - 1));
  running_mean = madd(momentum, mean, (Acc(1) - momentum) * running_mean);
  running_var = madd(momentum, unbiased, (Acc(1) - momentum) * running_var);
}

}  // namespace fastbn
