// Run-time choice of the CPU kernel table.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace fastbn {
namespace cpu {

namespace {
bool use_avx2() {
  static const bool yes = [] {
    const char* env = std::getenv("FASTBN_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "base") == 0) return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return yes;
}
}  // namespace

template <class T> const Kernels<T>& kernels() { return use_avx2() ? avx2_kernels<T>() : base_kernels<T>(); }
template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();
template const Kernels<f16>& kernels<f16>();
template const Kernels<bf16>& kernels<bf16>();

const char* isa_name() { return use_avx2() ? "avx2" : "base"; }

}  // namespace cpu
}  // namespace fastbn
