// 16 x fp32 vector type for AVX-512 (F+BW+VL+DQ), compiled in its own target region and
// namespace (see common.h for why). Kernels are written once against this interface:
//   R, Mask, Acc, W, kLibmExp, kScalef  register, lane predicate, scalar type, lanes, exp kind
//   set1 zero add sub mul div fma(a*b+c) max(a>b?a:b) min(a<b?a:b) pow2_shifted [scalef]
//   lt eq isnan where(m ? a : b) any first(n: lanes < n) hmax hsum
//   load/loadn(p[, n]) from float, bf16_t, f16_t, uint8_t (a bool mask: 1 -> 0, 0 -> -inf);
//   loadn zero-fills lanes >= n. store/storen(p, v[, n]) and stream (non-temporal, aligned p)
//   to float, bf16_t, f16_t; fence orders the streamed stores.
#pragma once
// gcc 12's AVX-512 intrinsics use deliberately undefined vectors (_mm512_undefined_*), which
// trips -W(maybe-)uninitialized inside the header once inlined; silence it for that header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "common.h"

FASTATTN_BEGIN_AVX512
namespace fastattn::cpu::avx512 {

struct Vec {
  using R = __m512;
  using Mask = __mmask16;
  using Acc = float;
  static constexpr int W = 16;
  static constexpr int kRegs = 32;  // zmm0-31
  static constexpr bool kLibmExp = false;
  static constexpr bool kScalef = true;

  static inline R set1(float v) { return _mm512_set1_ps(v); }
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R div(R a, R b) { return _mm512_div_ps(a, b); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static inline R min(R a, R b) { return _mm512_min_ps(a, b); }
  static inline R pow2_shifted(R t) {  // 2^n from t = n + 1.5*2^23 (n in [-126, 127])
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static inline R scalef(R a, R n) { return _mm512_scalef_ps(a, n); }  // a * 2^floor(n)
  static inline Mask lt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static inline Mask eq(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static inline Mask isnan(R a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static inline R where(Mask m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }
  static inline bool any(Mask m) { return m != 0; }
  static inline Mask first(int n) { return Mask((1u << n) - 1u); }  // n in [0, 16)
  static inline float hmax(R a) { return _mm512_reduce_max_ps(a); }
  static inline float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static inline float exp_libm(float) { return 0.f; }  // unused (kLibmExp is false)

  // bf16 -> fp32 is a 16-bit shift; fp16 goes through vcvtph2ps.
  static inline R cvt_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline R bool_to_additive(__m128i b) {  // 16 bytes, nonzero = keep
    const Mask keep = _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(b), _mm512_cvtepu8_epi32(b));
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-__builtin_inff()), _mm512_setzero_ps());
  }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline R load(const bf16_t* p) { return cvt_bf16(_mm256_loadu_si256((const __m256i*)p)); }
  static inline R load(const f16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  }
  static inline R load(const uint8_t* p) {
    return bool_to_additive(_mm_loadu_si128((const __m128i*)p));
  }
  // Masked loads never touch memory past lane n-1 (fault suppression).
  static inline R loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static inline R loadn(const bf16_t* p, int n) {
    return cvt_bf16(_mm256_maskz_loadu_epi16(first(n), p));
  }
  static inline R loadn(const f16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
  }
  static inline R loadn(const uint8_t* p, int n) {
    return _mm512_maskz_mov_ps(first(n), bool_to_additive(_mm_maskz_loadu_epi8(first(n), p)));
  }

  // fp32 -> bf16, round to nearest even; NaN stays NaN (quieted) instead of rounding to inf.
  static inline __m256i to_bf16(R v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_mov_epi32(r, isnan(v), qnan);
    return _mm512_cvtepi32_epi16(r);
  }
  static inline __m256i to_f16(R v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static inline void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline void store(bf16_t* p, R v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
  static inline void store(f16_t* p, R v) { _mm256_storeu_si256((__m256i*)p, to_f16(v)); }
  // Non-temporal (cache-bypassing) stores of a full vector to a W*sizeof(T)-aligned address.
  static inline void stream(float* p, R v) { _mm512_stream_ps(p, v); }
  static inline void stream(bf16_t* p, R v) { _mm256_stream_si256((__m256i*)p, to_bf16(v)); }
  static inline void stream(f16_t* p, R v) { _mm256_stream_si256((__m256i*)p, to_f16(v)); }
  static inline void fence() { _mm_sfence(); }
  static inline void storen(float* p, R v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static inline void storen(bf16_t* p, R v, int n) {
    _mm256_mask_storeu_epi16(p, first(n), to_bf16(v));
  }
  static inline void storen(f16_t* p, R v, int n) {
    _mm256_mask_storeu_epi16(p, first(n), to_f16(v));
  }
};

#include "vec_math_impl.h"

}  // namespace fastattn::cpu::avx512
FASTATTN_END_ISA

// AVX-512 plus the BF16 extension (Cooper Lake, Zen 4 and later): fp32 -> bf16 in one
// instruction, vcvtneps2bf16 (round to nearest even, NaN kept; subnormal results flush to 0).
// Everything else is inherited from avx512::Vec. Used for bf16 inputs when the CPU has it.
FASTATTN_BEGIN_AVX512BF16
namespace fastattn::cpu::avx512bf16 {

struct Vec : avx512::Vec {
  using Base = avx512::Vec;
  using Base::store;
  using Base::storen;
  using Base::stream;
  static inline __m256i to_bf16(R v) { return (__m256i)_mm512_cvtneps_pbh(v); }
  static inline void store(bf16_t* p, R v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
  static inline void stream(bf16_t* p, R v) { _mm256_stream_si256((__m256i*)p, to_bf16(v)); }
  static inline void storen(bf16_t* p, R v, int n) {
    _mm256_mask_storeu_epi16(p, first(n), to_bf16(v));
  }
};

#include "vec_math_impl.h"

}  // namespace fastattn::cpu::avx512bf16
FASTATTN_END_ISA
