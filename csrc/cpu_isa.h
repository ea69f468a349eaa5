// Run-time choice of the CPU vector path: everything fastattn knows about CPU features is here.
// Kernels are compiled for every tier (function-level target attributes), and the best one the
// running CPU supports is picked once, so one binary runs on any x86-64 CPU.
// FASTATTN_CPU_ISA=avx512bf16|avx512|avx2|scalar forces a (supported) lower tier;
// FASTATTN_CPU_AVX512BF16=0 (the older variable) caps it at avx512.
#pragma once

namespace fastattn::cpu {

// The tiers, in order: each kernel table (cpu_dispatch.h) is indexed by them, and a tier's
// kernels may use the instructions of every tier below it. kAvx512Bf16: AVX-512 plus AVX512_BF16
// (one-instruction fp32 -> bf16 conversion, bf16-pair dot products).
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kIsaTiers = 4;

Isa isa();                      // the tier in use (cached after the first call)
const char* isa_name(Isa isa);  // "avx512bf16", "avx512", "avx2" or "scalar"
const char* compiled_isas();    // every tier compiled in, best first: "avx512bf16,...,scalar"

// Whether the attention kernels take their bf16 tile products as vdpbf16ps pairs (tier
// kAvx512Bf16 only). On by default except on Intel, where the pairs ran 1.55x slower than fp32
// FMA (vdpbf16ps issues on one port there, FMA on two); FASTATTN_CPU_AVX512BF16=1 forces it on.
bool bf16_pair_products();

// Measured fp32 FMA GFLOP/s of the vector path in use on `threads` threads (best of `rounds`
// rounds of a few tens of ms each; csrc/cpu_peak.cpp); 0 on the scalar path.
double fma_peak_gflops(int threads, int rounds);

}  // namespace fastattn::cpu
