// The bfloat16 CPU kernels compiled for AVX-512F/BW/VL/DQ with AVX512_BF16 (+ AVX2, FMA, F16C;
// chosen at run time when the CPU has them, e.g. Zen 4, Sapphire Rapids): the AVX-512 kernels
// with the float -> bfloat16 rounding done by VCVTNEPS2BF16 (vec.h, FASTBN_CPU_AVX512_BF16),
// same bits as isa_avx512.cpp. Only the bfloat16 table lives here; the other storage types
// write no bfloat16. Namespace isa_avx512bf16, for the reason isa_avx512.cpp gives.
#define FASTBN_HOST_FMA 1
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
// As in isa_avx512.cpp: GCC 12's AVX-512 headers trip -W(maybe-)uninitialized (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define FASTBN_CPU_AVX2 0
#define FASTBN_CPU_AVX512 1
#define FASTBN_CPU_AVX512_BF16 1
namespace fastbn {
namespace cpu {
namespace isa_avx512bf16 {
#include "vec.h"
#include "kernels_impl.h"
}  // namespace isa_avx512bf16
}  // namespace cpu
}  // namespace fastbn

#define FASTBN_ISA_NS isa_avx512bf16
#define FASTBN_ISA_GETTER avx512bf16_kernels
#define FASTBN_ISA_TYPES(X) X(bf16)
#include "isa_table.inc"
#pragma GCC pop_options
#pragma GCC diagnostic pop

#else  // not x86-64: the baseline table serves (never selected)
namespace fastbn {
namespace cpu {
template <> const Kernels<bf16>& avx512bf16_kernels<bf16>() { return base_kernels<bf16>(); }
}  // namespace cpu
}  // namespace fastbn
#endif
