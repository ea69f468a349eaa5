// Run-time choice of the CPU vector path (see cpu_isa.h). Detection uses gcc's cpu model, which
// also checks that the OS saves the AVX/AVX-512 register state (XGETBV), so a path is never
// chosen that would fault with an illegal instruction.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace fastattn::cpu {
namespace {

constexpr const char* kNames[kIsaTiers] = {"scalar", "avx2", "avx512", "avx512bf16"};

const char* env_or_null(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? v : nullptr;
}

Isa best_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// FASTATTN_CPU_ISA may lower the tier (to compare or debug), never raise it: asking for a tier
// the CPU lacks falls back to the best supported one with a warning, and so does an unknown
// value (a warning, not an error: the choice is made when the package is imported).
Isa choose() {
  Isa best = best_supported();
  const char* bf16 = env_or_null("FASTATTN_CPU_AVX512BF16");
  if (bf16 != nullptr && bf16[0] == '0' && best == Isa::kAvx512Bf16) best = Isa::kAvx512;
  const char* env = env_or_null("FASTATTN_CPU_ISA");
  if (env == nullptr || std::strcmp(env, "auto") == 0) return best;
  int want = -1;
  for (int i = 0; i < kIsaTiers; ++i)
    if (std::strcmp(env, kNames[i]) == 0) want = i;
  if (want < 0) {
    TORCH_WARN("fastattn: FASTATTN_CPU_ISA='", env, "' is not one of ", compiled_isas(),
               ", auto; using ", isa_name(best));
    return best;
  }
  if (want > static_cast<int>(best)) {
    TORCH_WARN("fastattn: FASTATTN_CPU_ISA=", env, " is not supported by this CPU; using ",
               isa_name(best), " instead");
    return best;
  }
  return static_cast<Isa>(want);
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();  // thread-safe one-time initialisation
  return chosen;
}

const char* isa_name(Isa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kIsaTiers ? kNames[i] : "unknown";
}

const char* compiled_isas() {
  static const std::string names = [] {
    std::string s;
    for (int i = kIsaTiers - 1; i >= 0; --i) s += std::string(kNames[i]) + (i > 0 ? "," : "");
    return s;
  }();
  return names.c_str();
}

bool bf16_pair_products() {
  static const bool on = [] {
    if (isa() != Isa::kAvx512Bf16) return false;
    const char* env = env_or_null("FASTATTN_CPU_AVX512BF16");
    if (env != nullptr && env[0] == '1') return true;
#if defined(__x86_64__) || defined(__i386__)
    return !__builtin_cpu_is("intel");
#else
    return false;
#endif
  }();
  return on;
}

}  // namespace fastattn::cpu
