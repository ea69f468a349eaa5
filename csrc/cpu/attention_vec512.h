// AVX-512 additions to the Vec interface used only by the attention kernels (attention_impl.h
// detects them with `requires`): an in-register 16 x 16 fp32 transpose, for packing K^T / V^T.
// NO include guard and no namespace on purpose: included inside an AVX-512 target region and ISA
// namespace, after vec_avx512.h, as a mixin over that namespace's Vec.
template <class Base>
struct AttnVec512 : Base {
  using R = typename Base::R;
  static constexpr bool kTranspose16 = true;
  // r[i] (row i, 16 lanes) becomes column i.
  static inline void transpose16(R* r) {
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
