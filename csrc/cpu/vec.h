// Fixed-width vectors of the accumulation type for the CPU kernels. Torch-free.
//
// One register's worth of lanes: Vec<float> holds 16 lanes and Vec<double> 8 with
// FASTBN_CPU_AVX512 (AVX-512F/BW/VL intrinsics), else 8 and 4 (256 bits). Included by the ISA
// units (isa_base.cpp, isa_avx2.cpp, isa_avx512.cpp) inside their own namespace: with
// FASTBN_CPU_AVX2 it maps to AVX2/FMA/F16C intrinsics, with neither macro to plain lane loops
// the compiler vectorises for the baseline ISA. load(p) reads W storage values (float, double,
// f16, bf16) and widens them; store(p) rounds to the storage type (round to nearest even);
// stream(p) stores the same non-temporally (p aligned to W values; a plain store in the
// baseline unit); load_part / store_part do the same as load / store for the first n < W values
// (vector tails). With FASTBN_CPU_AVX512_BF16 (the AVX-512 unit built with AVX512_BF16) the
// float -> bfloat16 rounding is one instruction where that gives the same bits. The free
// functions madd (fused in the AVX2 and AVX-512 units), where_finite, relu_value and
// where_positive are bn_math.h's scalar ones lane by lane, so bn_math.h's formulas take a Vec
// as their value type.
#pragma once

template <class Acc> struct Vec;

// The scalar versions stay visible beside the Vec overloads declared in this namespace.
using ::fastbn::madd;
using ::fastbn::relu_value;
using ::fastbn::where_finite;
using ::fastbn::where_positive;

#if FASTBN_CPU_AVX512

template <> struct Vec<float> {
  static constexpr int W = 16;
  __m512 v;
  static Vec set1(float a) { return {_mm512_set1_ps(a)}; }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const f16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static Vec load(const bf16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  __m256i f16_bits() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  __m256i bf16_bits() const {  // round to nearest even; NaN -> 0x7FC0 (bn_math.h's scalar rule)
#if FASTBN_CPU_AVX512_BF16
    // VCVTNEPS2BF16 rounds to nearest even too, but reads a denormal as zero and keeps a NaN's
    // sign and payload: a vector with a NaN or denormal lane (fpclass: QNaN 0x01, denormal
    // 0x20, SNaN 0x80) takes the integer rounding below, so the bits are the same either way.
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0xA1) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  void store(f16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f16_bits()); }
  void store(bf16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits()); }
  // Non-temporal stores (p aligned to the W values' size).
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  void stream(f16* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), f16_bits()); }
  void stream(bf16* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_bits()); }
  void lanes(float* out) const { _mm512_storeu_ps(out, v); }
  // The first n < W values (the other lanes 0 / not written), by masked loads and stores.
  static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1); }
  static Vec load_part(const float* p, int n) { return {_mm512_maskz_loadu_ps(first(n), p)}; }
  static Vec load_part(const f16* p, int n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p))}; }
  static Vec load_part(const bf16* p, int n) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store_part(float* p, int n) const { _mm512_mask_storeu_ps(p, first(n), v); }
  void store_part(f16* p, int n) const { _mm256_mask_storeu_epi16(p, first(n), f16_bits()); }
  void store_part(bf16* p, int n) const { _mm256_mask_storeu_epi16(p, first(n), bf16_bits()); }
};

template <> struct Vec<double> {
  static constexpr int W = 8;
  __m512d v;
  static Vec set1(double a) { return {_mm512_set1_pd(a)}; }
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void stream(double* p) const { _mm512_stream_pd(p, v); }
  void lanes(double* out) const { _mm512_storeu_pd(out, v); }
  static __mmask8 first(int n) { return static_cast<__mmask8>((1u << n) - 1); }
  static Vec load_part(const double* p, int n) { return {_mm512_maskz_loadu_pd(first(n), p)}; }
  void store_part(double* p, int n) const { _mm512_mask_storeu_pd(p, first(n), v); }
};

inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec<float> operator/(Vec<float> a, Vec<float> b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec<double> operator+(Vec<double> a, Vec<double> b) { return {_mm512_add_pd(a.v, b.v)}; }
inline Vec<double> operator-(Vec<double> a, Vec<double> b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline Vec<double> operator*(Vec<double> a, Vec<double> b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline Vec<double> operator/(Vec<double> a, Vec<double> b) { return {_mm512_div_pd(a.v, b.v)}; }

inline Vec<float> madd(Vec<float> x, Vec<float> a, Vec<float> b) { return {_mm512_fmadd_ps(x.v, a.v, b.v)}; }
inline Vec<double> madd(Vec<double> x, Vec<double> a, Vec<double> b) { return {_mm512_fmadd_pd(x.v, a.v, b.v)}; }
// max(0, x) returns x where x is NaN (the second operand), as relu_value does.
inline Vec<float> relu_value(Vec<float> x) { return {_mm512_max_ps(_mm512_setzero_ps(), x.v)}; }
inline Vec<double> relu_value(Vec<double> x) { return {_mm512_max_pd(_mm512_setzero_pd(), x.v)}; }
inline Vec<float> where_positive(Vec<float> pre, Vec<float> value) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(pre.v, _mm512_setzero_ps(), _CMP_GT_OQ), value.v)};
}
inline Vec<double> where_positive(Vec<double> pre, Vec<double> value) {
  return {_mm512_maskz_mov_pd(_mm512_cmp_pd_mask(pre.v, _mm512_setzero_pd(), _CMP_GT_OQ), value.v)};
}
// Lanes 0-7 / 8-15 of a float vector, widened to double.
inline Vec<double> widen_lo(Vec<float> v) { return {_mm512_cvtps_pd(_mm512_castps512_ps256(v.v))}; }
inline Vec<double> widen_hi(Vec<float> v) {
  return {_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v.v), 1)))};
}
// a where d is finite (d - d == 0), else b.
inline Vec<float> where_finite(Vec<float> d, Vec<float> a, Vec<float> b) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_sub_ps(d.v, d.v), _mm512_setzero_ps(), _CMP_EQ_OQ), b.v, a.v)};
}
inline Vec<double> where_finite(Vec<double> d, Vec<double> a, Vec<double> b) {
  return {_mm512_mask_blend_pd(_mm512_cmp_pd_mask(_mm512_sub_pd(d.v, d.v), _mm512_setzero_pd(), _CMP_EQ_OQ), b.v, a.v)};
}

#elif FASTBN_CPU_AVX2

// load_part / store_part of an AVX2 vector V (no masked loads and stores for 16-bit values
// there): the first n < V::W values through a V::W-value buffer.
template <class V, class T> inline V buffered_load_part(const T* p, int n) {
  T t[V::W] = {};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return V::load(t);
}
template <class V, class T> inline void buffered_store_part(const V& v, T* p, int n) {
  T t[V::W];
  v.store(t);
  for (int i = 0; i < n; ++i) p[i] = t[i];
}

template <> struct Vec<float> {
  static constexpr int W = 8;
  __m256 v;
  static Vec set1(float a) { return {_mm256_set1_ps(a)}; }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const f16* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static Vec load(const bf16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  __m128i f16_bits() const { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  __m128i bf16_bits() const {  // round to nearest even; NaN -> 0x7FC0 (bn_math.h's scalar rule)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  void store(f16* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f16_bits()); }
  void store(bf16* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits()); }
  // Non-temporal stores (p aligned to the W values' size).
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  void stream(f16* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), f16_bits()); }
  void stream(bf16* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bf16_bits()); }
  void lanes(float* out) const { _mm256_storeu_ps(out, v); }
  // The first n < W values (the other lanes 0 / not written), through a buffer.
  template <class T> static Vec load_part(const T* p, int n) { return buffered_load_part<Vec>(p, n); }
  template <class T> void store_part(T* p, int n) const { buffered_store_part(*this, p, n); }
};

template <> struct Vec<double> {
  static constexpr int W = 4;
  __m256d v;
  static Vec set1(double a) { return {_mm256_set1_pd(a)}; }
  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void stream(double* p) const { _mm256_stream_pd(p, v); }
  void lanes(double* out) const { _mm256_storeu_pd(out, v); }
  // The first n < W values (the other lanes 0 / not written), through a buffer.
  template <class T> static Vec load_part(const T* p, int n) { return buffered_load_part<Vec>(p, n); }
  template <class T> void store_part(T* p, int n) const { buffered_store_part(*this, p, n); }
};

// (Operators at namespace scope: GCC does not apply a target pragma to in-class friends.)
inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec<float> operator/(Vec<float> a, Vec<float> b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec<double> operator+(Vec<double> a, Vec<double> b) { return {_mm256_add_pd(a.v, b.v)}; }
inline Vec<double> operator-(Vec<double> a, Vec<double> b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline Vec<double> operator*(Vec<double> a, Vec<double> b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline Vec<double> operator/(Vec<double> a, Vec<double> b) { return {_mm256_div_pd(a.v, b.v)}; }

inline Vec<float> madd(Vec<float> x, Vec<float> a, Vec<float> b) { return {_mm256_fmadd_ps(x.v, a.v, b.v)}; }
inline Vec<double> madd(Vec<double> x, Vec<double> a, Vec<double> b) { return {_mm256_fmadd_pd(x.v, a.v, b.v)}; }
// max(0, x) returns x where x is NaN (the second operand), as relu_value does.
inline Vec<float> relu_value(Vec<float> x) { return {_mm256_max_ps(_mm256_setzero_ps(), x.v)}; }
inline Vec<double> relu_value(Vec<double> x) { return {_mm256_max_pd(_mm256_setzero_pd(), x.v)}; }
inline Vec<float> where_positive(Vec<float> pre, Vec<float> value) {
  return {_mm256_and_ps(_mm256_cmp_ps(pre.v, _mm256_setzero_ps(), _CMP_GT_OQ), value.v)};
}
inline Vec<double> where_positive(Vec<double> pre, Vec<double> value) {
  return {_mm256_and_pd(_mm256_cmp_pd(pre.v, _mm256_setzero_pd(), _CMP_GT_OQ), value.v)};
}
// Lanes 0-3 / 4-7 of a float vector, widened to double.
inline Vec<double> widen_lo(Vec<float> v) { return {_mm256_cvtps_pd(_mm256_castps256_ps128(v.v))}; }
inline Vec<double> widen_hi(Vec<float> v) { return {_mm256_cvtps_pd(_mm256_extractf128_ps(v.v, 1))}; }
// a where d is finite (d - d == 0), else b.
inline Vec<float> where_finite(Vec<float> d, Vec<float> a, Vec<float> b) {
  const __m256 fin = _mm256_cmp_ps(_mm256_sub_ps(d.v, d.v), _mm256_setzero_ps(), _CMP_EQ_OQ);
  return {_mm256_blendv_ps(b.v, a.v, fin)};
}
inline Vec<double> where_finite(Vec<double> d, Vec<double> a, Vec<double> b) {
  const __m256d fin = _mm256_cmp_pd(_mm256_sub_pd(d.v, d.v), _mm256_setzero_pd(), _CMP_EQ_OQ);
  return {_mm256_blendv_pd(b.v, a.v, fin)};
}

#else  // baseline ISA: lane loops

template <class Acc> struct Vec {
  static constexpr int W = 32 / sizeof(Acc);
  Acc v[W];
  static Vec set1(Acc a) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  static Vec zero() { return set1(Acc(0)); }
  template <class T> static Vec load(const T* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = to_acc(p[i]);
    return r;
  }
  template <class T> void store(T* p) const {
    for (int i = 0; i < W; ++i) p[i] = from_acc<T>(v[i]);
  }
  template <class T> void stream(T* p) const { store(p); }  // no non-temporal stores here
  friend Vec operator+(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend Vec operator-(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] -= b.v[i];
    return a;
  }
  friend Vec operator*(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  friend Vec operator/(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] /= b.v[i];
    return a;
  }
  friend Vec madd(Vec x, Vec a, Vec b) {
    for (int i = 0; i < W; ++i) x.v[i] = ::fastbn::madd(x.v[i], a.v[i], b.v[i]);
    return x;
  }
  friend Vec relu_value(Vec x) {
    for (int i = 0; i < W; ++i) x.v[i] = ::fastbn::relu_value(x.v[i]);
    return x;
  }
  friend Vec where_positive(Vec pre, Vec value) {
    for (int i = 0; i < W; ++i) value.v[i] = ::fastbn::where_positive(pre.v[i], value.v[i]);
    return value;
  }
  friend Vec where_finite(Vec d, Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] = ::fastbn::where_finite(d.v[i], a.v[i], b.v[i]);
    return a;
  }
  void lanes(Acc* out) const {
    for (int i = 0; i < W; ++i) out[i] = v[i];
  }
  // The first n < W values (the other lanes 0 / not written).
  template <class T> static Vec load_part(const T* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = to_acc(p[i]);
    return r;
  }
  template <class T> void store_part(T* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = from_acc<T>(v[i]);
  }
};

inline Vec<double> widen_lo(const Vec<float>& v) {
  Vec<double> r;
  for (int i = 0; i < 4; ++i) r.v[i] = v.v[i];
  return r;
}
inline Vec<double> widen_hi(const Vec<float>& v) {
  Vec<double> r;
  for (int i = 0; i < 4; ++i) r.v[i] = v.v[4 + i];
  return r;
}

#endif

// Part h (0, or 1 for a float vector's upper half) of a vector of the accumulation type, in double.
inline Vec<double> part_wide(const Vec<double>& v, int) { return v; }
inline Vec<double> part_wide(const Vec<float>& v, int h) { return h ? widen_hi(v) : widen_lo(v); }

// Sums in double of vectors of the accumulation type, into a pair (lo, hi): a float vector's
// two halves are widened into lo and hi; a double vector is added to lo with its rounding
// error compensated into hi (TwoSum), so double input keeps about twice double precision.
// The sum of the pair's lanes is the total (pair_total).
inline void two_sum_into(Vec<double>& lo, Vec<double>& hi, const Vec<double>& v) {
  const Vec<double> s = lo + v;
  const Vec<double> bb = s - lo;
  hi = hi + ((lo - (s - bb)) + (v - bb));
  lo = s;
}
inline void add_wide(Vec<double>& lo, Vec<double>& hi, const Vec<double>& v) { two_sum_into(lo, hi, v); }
inline void add_wide(Vec<double>& lo, Vec<double>& hi, const Vec<float>& v) {
  lo = lo + widen_lo(v);
  hi = hi + widen_hi(v);
}

// The total of an add_wide pair, lane-wise: lo + hi; for a compensated (double)
// pair, lo alone where it is not finite (the plain sum's inf or NaN, which the compensation
// would turn into NaN).
template <class Acc> inline Vec<double> pair_total(const Vec<double>& lo, const Vec<double>& hi) {
  if constexpr (sizeof(Acc) == sizeof(double)) {
    return where_finite(lo, lo + hi, lo);
  } else {
    return lo + hi;
  }
}

template <class Acc> inline Acc hsum(const Vec<Acc>& a) {
  Acc l[Vec<Acc>::W];
  a.lanes(l);
  Acc s = 0;
  for (int i = 0; i < Vec<Acc>::W; ++i) s += l[i];
  return s;
}

// Stores v at p: a non-temporal store when `stream` and p is aligned to the vector's size in
// T (the output is larger than the last-level cache and is not read back soon), else a plain one.
template <class V, class T> inline void put(const V& v, T* p, bool stream) {
  if (stream && reinterpret_cast<std::uintptr_t>(p) % (V::W * sizeof(T)) == 0) {
    v.stream(p);
  } else {
    v.store(p);
  }
}
// Whether put2 rounds a pair of vectors of T with one instruction: bfloat16 with AVX512_BF16.
// The planar normalisation (kernels_impl.h affine_values) then takes two vectors a step.
template <class T> constexpr bool kPairedStores =
#if FASTBN_CPU_AVX512_BF16
    std::is_same<T, bf16>::value;
#else
    false;
#endif

// put(a, p, stream) then put(b, p + W, stream). With kPairedStores<T> the pair is rounded by
// one VCVTNE2PS2BF16 (lane by lane the rounding of VCVTNEPS2BF16, in half the instructions:
// Zen 4, the bfloat16 (8, 512, 28, 28) normalisation in L1/L2, one thread, 1.6 -> 1.1-1.2 ns a
// vector) and stored as one 64-byte vector (non-temporally where `stream` and p is 64-byte
// aligned), unless a lane is NaN or denormal (bf16_bits: those take the integer rounding).
template <class V, class T> inline __attribute__((always_inline)) void put2(const V& a, const V& b, T* p, bool stream) {
#if FASTBN_CPU_AVX512_BF16
  if constexpr (kPairedStores<T>) {
    const bool plain = !stream, aligned = reinterpret_cast<std::uintptr_t>(p) % 64 == 0;
    if (__builtin_expect((_mm512_fpclass_ps_mask(a.v, 0xA1) | _mm512_fpclass_ps_mask(b.v, 0xA1)) == 0, 1) &&
        (plain || aligned)) {
      const __m512i r = (__m512i)_mm512_cvtne2ps_pbh(b.v, a.v);  // a's lanes first
      if (plain) _mm512_storeu_si512(p, r);
      else _mm512_stream_si512(reinterpret_cast<__m512i*>(p), r);
      return;
    }
  }
#endif
  put(a, p, stream);
  put(b, p + V::W, stream);
}

// Orders a kernel's non-temporal stores before whatever the caller does next.
inline void stream_fence() {
#if FASTBN_CPU_AVX2 || FASTBN_CPU_AVX512
  _mm_sfence();
#endif
}
