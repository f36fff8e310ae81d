// Fixed-width vectors of the accumulation type for the CPU kernels. Torch-free.
//
// Vec<float> holds 8 lanes, Vec<double> 4 (one 256-bit register). Included by the ISA units
// (isa_base.cpp, isa_avx2.cpp) inside their own namespace: with FASTBN_CPU_AVX2 defined it
// maps to AVX2/FMA/F16C intrinsics, otherwise to plain lane loops the compiler vectorises
// for the baseline ISA. load(p) reads W storage values (float, double, f16, bf16) and widens
// them; store(p, v) rounds to the storage type (round to nearest even).
#pragma once

template <class Acc> struct Vec;

#if FASTBN_CPU_AVX2

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
  void store(f16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(bf16* p) const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  // x * a + b, fused.
  static Vec madd(Vec x, Vec a, Vec b) { return {_mm256_fmadd_ps(x.v, a.v, b.v)}; }
  static Vec relu(Vec x) { return {_mm256_max_ps(x.v, _mm256_setzero_ps())}; }
  // value where pre > 0, else 0 (NaN pre gives 0, as relu's gradient does).
  static Vec where_positive(Vec pre, Vec value) {
    return {_mm256_and_ps(_mm256_cmp_ps(pre.v, _mm256_setzero_ps(), _CMP_GT_OQ), value.v)};
  }
  void lanes(float* out) const { _mm256_storeu_ps(out, v); }
};

template <> struct Vec<double> {
  static constexpr int W = 4;
  __m256d v;
  static Vec set1(double a) { return {_mm256_set1_pd(a)}; }
  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  static Vec madd(Vec x, Vec a, Vec b) { return {_mm256_fmadd_pd(x.v, a.v, b.v)}; }
  static Vec relu(Vec x) { return {_mm256_max_pd(x.v, _mm256_setzero_pd())}; }
  static Vec where_positive(Vec pre, Vec value) {
    return {_mm256_and_pd(_mm256_cmp_pd(pre.v, _mm256_setzero_pd(), _CMP_GT_OQ), value.v)};
  }
  void lanes(double* out) const { _mm256_storeu_pd(out, v); }
};

// (Operators at namespace scope: GCC does not apply a target pragma to in-class friends.)
inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec<double> operator+(Vec<double> a, Vec<double> b) { return {_mm256_add_pd(a.v, b.v)}; }
inline Vec<double> operator-(Vec<double> a, Vec<double> b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline Vec<double> operator*(Vec<double> a, Vec<double> b) { return {_mm256_mul_pd(a.v, b.v)}; }

// Scalar x * a + b with the same rounding as Vec::madd (fused), for loop tails.
inline float smadd(float x, float a, float b) { return __builtin_fmaf(x, a, b); }
inline double smadd(double x, double a, double b) { return __builtin_fma(x, a, b); }

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
  static Vec madd(Vec x, Vec a, Vec b) {
    for (int i = 0; i < W; ++i) x.v[i] = x.v[i] * a.v[i] + b.v[i];
    return x;
  }
  static Vec relu(Vec x) {
    for (int i = 0; i < W; ++i) x.v[i] = x.v[i] > Acc(0) ? x.v[i] : Acc(0);
    return x;
  }
  static Vec where_positive(Vec pre, Vec value) {
    for (int i = 0; i < W; ++i) value.v[i] = pre.v[i] > Acc(0) ? value.v[i] : Acc(0);
    return value;
  }
  void lanes(Acc* out) const {
    for (int i = 0; i < W; ++i) out[i] = v[i];
  }
};

inline float smadd(float x, float a, float b) { return x * a + b; }
inline double smadd(double x, double a, double b) { return x * a + b; }

#endif

template <class Acc> inline Acc hsum(const Vec<Acc>& a) {
  Acc l[Vec<Acc>::W];
  a.lanes(l);
  Acc s = 0;
  for (int i = 0; i < Vec<Acc>::W; ++i) s += l[i];
  return s;
}
