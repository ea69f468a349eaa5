// Run-time choice of the CPU vector path. Kernels are compiled for several ISAs (function-level
// target attributes), and the best one the running CPU supports is picked once, so one binary
// runs on any x86-64 CPU. FASTATTN_CPU_ISA=avx512|avx2|scalar forces a (supported) lower path.
#pragma once

namespace fastattn::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa isa();                      // the path in use (cached after the first call)
const char* isa_name(Isa isa);  // "avx512", "avx2" or "scalar"
const char* compiled_isas();    // e.g. "avx512,avx2,scalar"

// Measured fp32 FMA GFLOP/s of the vector path in use on `threads` threads (best of `rounds`
// rounds of a few tens of ms each; csrc/cpu_peak.cpp); 0 on the scalar path.
double fma_peak_gflops(int threads, int rounds);

}  // namespace fastattn::cpu
