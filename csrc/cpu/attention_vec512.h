// AVX-512 additions to the Vec interface used only by the attention kernels (attention_impl.h
// detects them with `requires`): an in-register 16 x 16 fp32 transpose, for packing K^T / V^T,
// and, with Dot (AVX512_BF16 target only), the bf16 pair dot product vdpbf16ps and the packings
// it reads: bf16 pairs along head_dim (Q, K^T) or along keys (P, V).
// NO include guard and no namespace on purpose: included inside an AVX-512 target region and ISA
// namespace, after vec_avx512.h, as a mixin over that namespace's Vec.
template <class Base, bool Dot>
struct AttnVec512 : Base {
  using R = typename Base::R;
  static constexpr bool kTranspose = true;  // transpose: W x W in registers
  static constexpr bool kDotBf16 = Dot;

  // c + a.b over bf16 pairs: lane l gets a[2l] * b[2l] + a[2l+1] * b[2l+1] (fp32 accumulation).
  static inline R dot2(R c, R a, R b) { return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b); }
  static inline R bcast32(const uint32_t* p) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(int(*p)));
  }
  static inline R load32(const uint32_t* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  // n (0..32) bf16 values as raw bits in a vector, zero-filled.
  static inline R load_bf16x32(const bf16_t* p, int n) {
    const __mmask32 m = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1u);
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, p));
  }
  // dst[0, 32) (bf16) = s[0, n) rounded to bf16, zeros for lanes >= n (n in [0, 32]).
  static inline void to_bf16x32(uint16_t* dst, const float* s, int n) {
    const int n0 = n < 16 ? n : 16, n1 = n - n0;
    const R lo = _mm512_maskz_loadu_ps(__mmask16(n0 >= 16 ? 0xffffu : (1u << n0) - 1u), s);
    const R hi = _mm512_maskz_loadu_ps(__mmask16(n1 >= 16 ? 0xffffu : (1u << n1) - 1u), s + 16);
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  // dst[0, 16) (32-bit) = pairs (a[d], b[d]) for d < c (1..16), zeros after; b may be null (0).
  static inline void interleave16(uint32_t* dst, const bf16_t* a, const bf16_t* b, int c) {
    const __mmask16 m = __mmask16(c >= 16 ? 0xffffu : (1u << c) - 1u);
    const __m256i la = _mm256_maskz_loadu_epi16(m, a);
    const __m256i lb = b ? _mm256_maskz_loadu_epi16(m, b) : _mm256_setzero_si256();
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(la), lb, 1);
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, both));
  }
  // r[i] (row i, 16 lanes) becomes column i.
  static inline void transpose(R* r) {
    R t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // r[4i + k], 128-bit lane L: rows 4i..4i+3 at column 4L + k.
    for (int k = 0; k < 4; ++k) {
      const R x0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
      const R x1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
      const R y0 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
      const R y1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
      t[k] = _mm512_shuffle_f32x4(x0, y0, 0x88);
      t[k + 8] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
      t[k + 4] = _mm512_shuffle_f32x4(x1, y1, 0x88);
      t[k + 12] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
};
