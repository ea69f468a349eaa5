// ISA-neutral pieces shared by every CPU kernel translation unit: element types, dtype tags,
// scalar bf16/fp16 conversions and the macros that open a per-ISA target region.
//
// No torch headers here: this file is included by the ISA-specific kernel files. It must be
// included BEFORE any target region opens, so its inline functions are compiled for baseline
// x86-64 in every TU (identical definitions everywhere, hence no ODR hazard) and can still be
// inlined into AVX2/AVX-512 callers (a baseline callee may inline into a wider-ISA caller).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

// Target regions: `FASTATTN_BEGIN_<ISA>` ... `FASTATTN_END_ISA`. Every function defined in between
// (including template instantiations of templates defined there) is compiled for that ISA only.
// Code in a region lives in its own namespace (fastattn::cpu::<isa>), uses raw pointers and no
// std:: or torch templates, so no symbol compiled for a wide ISA can be picked by the linker for
// a caller that runs on a CPU without it.
#define FASTATTN_BEGIN_AVX512 \
  _Pragma("GCC push_options") \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2\")")
#define FASTATTN_BEGIN_AVX512BF16      \
  _Pragma("GCC push_options") _Pragma( \
      "GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2\")")
#define FASTATTN_BEGIN_AVX2 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2\")")
#define FASTATTN_END_ISA _Pragma("GCC pop_options")

namespace fastattn::cpu {

// Storage types. Plain structs without member functions: they generate no code symbols.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};
struct NoMask {};  // kernel template tag: no per-column mask vector to load

// Run-time dtype tags for the torch-facing side, which maps at::ScalarType onto these.
enum class DType : int { kFloat32, kBFloat16, kFloat16, kFloat64, kBool };

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(bf16_t h) { return f32_from_bits(uint32_t(h.bits) << 16); }

// Round to nearest even; a NaN stays a (quiet) NaN instead of rounding up into infinity.
inline bf16_t f32_to_bf16(float f) {
  const uint32_t u = bits_from_f32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  return bf16_t{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// IEEE half <-> float in software, for the scalar path (no F16C assumed there).
inline float f16_to_f32(f16_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = float(man) * 5.9604644775390625e-8f;
    return f32_from_bits(bits_from_f32(v) | sign);
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));  // inf / NaN
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

inline f16_t f32_to_f16(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};  // NaN
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                        // normal half (>= 2^-14)
    a -= 112u << 23;                                             // rebias the exponent 127 -> 15
    return f16_t{uint16_t(sign | ((a + 0xfffu + ((a >> 13) & 1u)) >> 13))};
  }
  if (a < 0x33000000u) return f16_t{uint16_t(sign)};  // below 2^-25: rounds to zero
  // Subnormal half: the value in units of 2^-24 is the 24-bit significand >> (126 - exponent).
  const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal: fine
  return f16_t{uint16_t(sign | r)};
}

}  // namespace fastattn::cpu
