// AVX-512 + BF16-extension instantiation of the attention kernels (attention_impl.h), bf16 data
// only: one-instruction fp32 -> bf16 conversion of the outputs.
#include <cstdlib>

#include "attention_kernels.h"
#include "vec_avx512.h"

FASTATTN_BEGIN_AVX512BF16
namespace fastattn::cpu::avx512bf16 {
#include "attention_vec512.h"
using AVec = AttnVec512<Vec, true>;
#include "attention_impl.h"
}  // namespace fastattn::cpu::avx512bf16
FASTATTN_END_ISA

namespace fastattn::cpu {

// Empty unless x is bf16 and the CPU has AVX512_BF16 (callers have checked AVX-512 itself) and
// the bf16-pair products pay off there. FASTATTN_CPU_AVX512BF16=0 turns them off, =1 on (to test
// either path on such a CPU). By default they are on except on Intel: on AMD Zen 5 vdpbf16ps
// doubles the multiply-adds per instruction, while on an Intel Xeon with AVX512_BF16 + AMX
// (2026-12-02, 2 threads) the pair path ran 1x16x2048x64 bf16 in 94.8 ms and the fp32 path (bf16
// converted while K/V are packed) in 60.9 ms: vdpbf16ps issues on one port there, FMA on two.
AttnKernels attention_kernels_avx512bf16(DType x, bool has_mask, DType mask) {
  static const bool usable = [] {
    const char* env = std::getenv("FASTATTN_CPU_AVX512BF16");
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16") || (env != nullptr && env[0] == '0')) return false;
    return (env != nullptr && env[0] == '1') || !__builtin_cpu_is("intel");
  }();
  if (x != DType::kBFloat16 || !usable) return AttnKernels{};
  return avx512bf16::Attn<avx512bf16::AVec>::table<bf16_t>(x, has_mask, mask);
}

}  // namespace fastattn::cpu
