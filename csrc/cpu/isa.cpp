// The instruction-set level the CPU kernels run at, decided once per process.
#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace ldmfast::cpu {

// 0: baseline, 1: AVX2+FMA+F16C, 2: also AVX-512 (F, BW, VL, DQ). LDMFAST_CPU_ISA=base, avx2 or
// avx512 caps it (read once), so that tests reach every variant on any machine.
int isa_level() {
#if defined(__x86_64__)
  static const int level = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
      return 0;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const char* cap = std::getenv("LDMFAST_CPU_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return 0;
    if (cap && std::strcmp(cap, "avx2") == 0) return 1;
    return avx512 ? 2 : 1;
  }();
  return level;
#else
  return 0;
#endif
}

bool has_avx512_bf16() {
#if defined(__x86_64__)
  static const bool bf16 = [] {
    const char* cap = std::getenv("LDMFAST_CPU_ISA");
    return isa_level() == 2 && !(cap && std::strcmp(cap, "avx512") == 0) &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return bf16;
#else
  return false;
#endif
}

}  // namespace ldmfast::cpu
