// Run-time choice of the CPU vector path (see cpu_isa.h). Detection uses gcc's cpu model, which
// also checks that the OS saves the AVX/AVX-512 register state (XGETBV), so a path is never
// chosen that would fault with an illegal instruction.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fastattn::cpu {
namespace {

Isa best_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// FASTATTN_CPU_ISA may lower the path (to compare or debug), never raise it: asking for a path
// the CPU lacks falls back to the best supported one with a warning, and so does an unknown
// value (a warning, not an error: the choice is made when the package is imported).
Isa choose() {
  const Isa best = best_supported();
  const char* env = std::getenv("FASTATTN_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "avx512") == 0) {
    want = Isa::kAvx512;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(env, "scalar") == 0) {
    want = Isa::kScalar;
  } else {
    TORCH_WARN("fastattn: FASTATTN_CPU_ISA='", env,
               "' is not one of avx512, avx2, scalar, auto; using ", isa_name(best));
    return best;
  }
  if (static_cast<int>(want) > static_cast<int>(best)) {
    TORCH_WARN("fastattn: FASTATTN_CPU_ISA=", env, " is not supported by this CPU; using ",
               isa_name(best), " instead");
    return best;
  }
  return want;
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();  // thread-safe one-time initialisation
  return chosen;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kScalar:
      return "scalar";
  }
  return "unknown";
}

const char* compiled_isas() { return "avx512,avx2,scalar"; }

}  // namespace fastattn::cpu
