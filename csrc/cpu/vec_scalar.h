// One-lane "vector" with the avx512::Vec interface (see vec_avx512.h), for CPUs without AVX2 and
// for float64. Vec<float> serves fp32/bf16/fp16 with fp32 math and the same polynomial exp as
// the SIMD paths; Vec<double> serves float64 (needed by gradcheck) with libm's exp.
// Baseline x86-64 code: no target region needed.
#pragma once
#include "common.h"

namespace fastattn::cpu::scalar {

template <class A>
struct Vec {
  using R = A;
  using Mask = bool;
  using Acc = A;
  static constexpr int W = 1;
  static constexpr bool kScalef = false;
  static constexpr bool kLibmExp = sizeof(A) == 8;

  static inline R set1(A v) { return v; }
  static inline R zero() { return A(0); }
  static inline R add(R a, R b) { return a + b; }
  static inline R sub(R a, R b) { return a - b; }
  static inline R mul(R a, R b) { return a * b; }
  static inline R div(R a, R b) { return a / b; }
  static inline R fma(R a, R b, R c) { return a * b + c; }
  static inline R max(R a, R b) { return a > b ? a : b; }
  static inline R min(R a, R b) { return a < b ? a : b; }
  static inline R pow2_shifted(R t) {  // 2^n from t = n + 1.5*2^23 (n in [-126, 127])
    return f32_from_bits((bits_from_f32(float(t)) + 127u) << 23);
  }
  static inline Mask lt(R a, R b) { return a < b; }
  static inline Mask eq(R a, R b) { return a == b; }
  static inline Mask isnan(R a) { return a != a; }
  static inline R where(Mask m, R a, R b) { return m ? a : b; }
  static inline bool any(Mask m) { return m; }
  static inline Mask first(int n) { return n > 0; }
  static inline A hmax(R a) { return a; }
  static inline A hsum(R a) { return a; }
  static inline R exp_libm(R a) { return __builtin_exp(a); }

  static inline R load(const float* p) { return A(*p); }
  static inline R load(const double* p) { return A(*p); }
  static inline R load(const bf16_t* p) { return A(bf16_to_f32(*p)); }
  static inline R load(const f16_t* p) { return A(f16_to_f32(*p)); }
  static inline R load(const uint8_t* p) { return *p ? A(0) : -A(__builtin_inf()); }
  template <class T>
  static inline R loadn(const T* p, int n) {
    return n > 0 ? load(p) : A(0);
  }
  static inline void store(float* p, R v) { *p = float(v); }
  static inline void store(double* p, R v) { *p = double(v); }
  static inline void store(bf16_t* p, R v) { *p = f32_to_bf16(float(v)); }
  static inline void store(f16_t* p, R v) { *p = f32_to_f16(float(v)); }
  template <class T>
  static inline void stream(T* p, R v) {  // plain store: no benefit for single elements
    store(p, v);
  }
  static inline void fence() {}
  template <class T>
  static inline void storen(T* p, R v, int n) {
    if (n > 0) store(p, v);
  }
};

#include "vec_math_impl.h"

}  // namespace fastattn::cpu::scalar
