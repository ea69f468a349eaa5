// AVX-512 + BF16-extension instantiation of the attention kernels (attention_impl.h), bf16 data
// only: one-instruction fp32 -> bf16 conversion of the outputs.
#include "../cpu_isa.h"
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

// The avx512bf16 tier's table: bf16 only, and only where the bf16-pair tile products pay off
// (cpu::bf16_pair_products(): not on Intel unless FASTATTN_CPU_AVX512BF16=1); empty otherwise, so
// the avx512 tier's table serves (bf16 converted to fp32 while K/V are packed).
AttnKernels attention_kernels_avx512bf16(DType x, bool has_mask, DType mask) {
  if (x != DType::kBFloat16 || !bf16_pair_products()) return AttnKernels{};
  return avx512bf16::Attn<avx512bf16::AVec>::table<bf16_t>(x, has_mask, mask);
}

}  // namespace fastattn::cpu
