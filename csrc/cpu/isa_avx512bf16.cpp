// The bfloat16 CPU kernels compiled for AVX-512F/BW/VL/DQ with AVX512_BF16 (+ AVX2, FMA, F16C;
// chosen at run time when the CPU has them, e.g. Zen 4, Sapphire Rapids): isa_avx512.cpp's
// kernels with the float -> bfloat16 rounding done by VCVTNEPS2BF16 (vec.h,
// FASTBN_CPU_AVX512_BF16), same bits as the AVX-512 build. Only the bfloat16 table lives here;
// the other storage types write no bfloat16.
#define FASTBN_AVX512_BF16_UNIT 1
#include "isa_avx512.cpp"
