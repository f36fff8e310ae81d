// Run-time choice of the CPU kernel table.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace fastbn {
namespace cpu {

namespace {
enum class Isa { base, avx2, avx512, avx512bf16 };

// The best instruction set this CPU has, capped by FASTBN_CPU_ISA (base, avx2, avx512 or
// avx512bf16; any other value caps nothing).
Isa isa() {
  static const Isa chosen = [] {
    Isa best = Isa::base;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
      best = avx512 ? Isa::avx512 : Isa::avx2;
      if (avx512 && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16")) best = Isa::avx512bf16;
    }
#endif
    const char* env = std::getenv("FASTBN_CPU_ISA");
    const Isa cap = env == nullptr                    ? Isa::avx512bf16
                    : std::strcmp(env, "base") == 0   ? Isa::base
                    : std::strcmp(env, "avx2") == 0   ? Isa::avx2
                    : std::strcmp(env, "avx512") == 0 ? Isa::avx512
                                                      : Isa::avx512bf16;
    return std::min(best, cap);
  }();
  return chosen;
}
}  // namespace

template <class T> const Kernels<T>& kernels() {
  switch (isa()) {
    case Isa::avx512bf16:
      if constexpr (std::is_same_v<T, bf16>) return avx512bf16_kernels<T>();
      return avx512_kernels<T>();
    case Isa::avx512: return avx512_kernels<T>();
    case Isa::avx2: return avx2_kernels<T>();
    default: return base_kernels<T>();
  }
}
template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();
template const Kernels<f16>& kernels<f16>();
template const Kernels<bf16>& kernels<bf16>();

const char* isa_name() {
  switch (isa()) {
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace cpu
}  // namespace fastbn
