// Stand-in for the CUDA toolkit's cuda_fp16.h: the storage type and the conversions device
// code uses, implemented with the compiler's _Float16 (IEEE binary16, round to nearest even).
#pragma once
#include <cstring>

struct __half {
  unsigned short __x;
};

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.__x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half out;
  std::memcpy(&out.__x, &h, 2);
  return out;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
