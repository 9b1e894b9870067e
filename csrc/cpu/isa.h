// Run-time choice among the CPU kernels' instruction-set variants.
#pragma once

namespace ldmfast::cpu {

// 0: baseline, 1: AVX2+FMA+F16C, 2: also AVX-512 (F, BW, VL, DQ). LDMFAST_CPU_ISA=base or avx2 caps it.
int isa_level();

}  // namespace ldmfast::cpu
