// Run-time choice among the CPU kernels' instruction-set variants.
#pragma once

namespace ldmfast::cpu {

// 0: baseline, 1: AVX2+FMA+F16C, 2: also AVX-512 (F, BW, VL, DQ). LDMFAST_CPU_ISA=base, avx2 or
// avx512 caps it.
int isa_level();

// Whether the AVX-512 kernels may also use AVX512-BF16's conversions (level 2 and the CPU has them;
// LDMFAST_CPU_ISA=avx512 or lower turns them off).
bool has_avx512_bf16();

}  // namespace ldmfast::cpu
