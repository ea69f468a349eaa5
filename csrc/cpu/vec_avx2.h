// 8 x fp32 vector type for AVX2 + FMA + F16C; same interface as avx512::Vec (see vec_avx512.h),
// compiled in its own target region and namespace. AVX2 has no masked 16-bit loads, so partial
// vectors (row tails) go through a small stack buffer.
#pragma once
#include <immintrin.h>

#include "common.h"

FASTATTN_BEGIN_AVX2
namespace fastattn::cpu::avx2 {

struct Vec {
  using R = __m256;
  using Mask = __m256;  // all-ones lanes where true
  using Acc = float;
  static constexpr int W = 8;
  static constexpr int kRegs = 16;  // ymm0-15
  static constexpr bool kScalef = false;
  static constexpr bool kLibmExp = false;

  static inline R set1(float v) { return _mm256_set1_ps(v); }
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R div(R a, R b) { return _mm256_div_ps(a, b); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static inline R min(R a, R b) { return _mm256_min_ps(a, b); }
  static inline R pow2_shifted(R t) {  // 2^n from t = n + 1.5*2^23 (n in [-126, 127])
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static inline Mask lt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static inline Mask eq(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static inline Mask isnan(R a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static inline R where(Mask m, R a, R b) { return _mm256_blendv_ps(b, a, m); }
  static inline bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static inline Mask first(int n) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota));
  }
  static inline float hmax(R a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static inline float hsum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static inline float exp_libm(float) { return 0.f; }  // unused (kLibmExp is false)

  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline R load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline R load(const f16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  }
  static inline R load(const uint8_t* p) {  // 8 bools: 1 (keep) -> 0, 0 -> -inf
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    const __m256 off = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
    return _mm256_and_ps(off, _mm256_set1_ps(-__builtin_inff()));
  }
  template <class T>
  static inline R loadn(const T* p, int n) {  // lanes >= n read as 0 (bool: as "keep")
    T tmp[W];
    __builtin_memset(tmp, sizeof(T) == 1 ? 1 : 0, sizeof(tmp));
    __builtin_memcpy(tmp, p, sizeof(T) * n);
    return load(tmp);
  }

  // fp32 -> bf16 round to nearest even, NaN kept; then pack the 8 low halves into 128 bits.
  static inline __m128i to_bf16(R v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i qnan = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(isnan(v)));
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [a0..a3 a0..a3]
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));  // qwords 0, 2
  }
  static inline __m128i to_f16(R v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static inline void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static inline void store(bf16_t* p, R v) { _mm_storeu_si128((__m128i*)p, to_bf16(v)); }
  static inline void store(f16_t* p, R v) { _mm_storeu_si128((__m128i*)p, to_f16(v)); }
  static inline void stream(float* p, R v) { _mm256_stream_ps(p, v); }
  static inline void stream(bf16_t* p, R v) { _mm_stream_si128((__m128i*)p, to_bf16(v)); }
  static inline void stream(f16_t* p, R v) { _mm_stream_si128((__m128i*)p, to_f16(v)); }
  static inline void fence() { _mm_sfence(); }
  // r[i] (row i, 8 lanes) becomes column i (pack_t's K^T blocks).
  static constexpr bool kTranspose = true;
  static inline void transpose(R* r) {
    R t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
      r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
  }
  template <class T>
  static inline void storen(T* p, R v, int n) {
    T tmp[W];
    store(tmp, v);
    __builtin_memcpy(p, tmp, sizeof(T) * n);
  }
};

#include "vec_math_impl.h"

}  // namespace fastattn::cpu::avx2
FASTATTN_END_ISA
