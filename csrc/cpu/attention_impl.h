// Attention kernels written once over the Vec interface (vec_<isa>.h) and instantiated per ISA and
// dtype: the forward (online softmax over key tiles), the split-K merge, and the FA2-style
// backward. See attention_kernels.h for the work layout and docs/attention.md for the semantics.
// NO include guard and no namespace on purpose: each attention_<isa>.cpp includes this file
// inside its own ISA namespace and target region, after vec_<isa>.h.
//
// Every product of two tiles goes through one register-blocked micro-kernel (attn_mk): C (M x N)
// (+)= A (M x K) B (K x N), A read as broadcast scalars A[m * lda + k * ask] from an opmath
// scratch (so transposed A costs nothing), B read as rows of N values (opmath scratch, or the
// caller's data in its own dtype, converted on load), C an opmath tile. MR rows x NV vectors of C
// stay in registers for the whole K loop.

template <class A, class B>
struct AttnSame {
  static constexpr bool value = false;
};
template <class A>
struct AttnSame<A, A> {
  static constexpr bool value = true;
};

// One element as opmath (a bool mask element as its additive value).
inline double attn_elem(const float* p) { return *p; }
inline double attn_elem(const double* p) { return *p; }
inline double attn_elem(const bf16_t* p) { return bf16_to_f32(*p); }
inline double attn_elem(const f16_t* p) { return f16_to_f32(*p); }
inline double attn_elem(const uint8_t* p) { return *p ? 0.0 : -__builtin_inf(); }

inline uint32_t attn_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

// Whether V offers the bf16 pair dot product (attention_vec512.h with Dot).
template <class V>
constexpr bool attn_has_dot() {
  if constexpr (requires { V::kDotBf16; })
    return V::kDotBf16;
  else
    return false;
}

template <class V>
struct Attn {
  using R = typename V::R;
  using Acc = typename V::Acc;
  static constexpr int W = V::W;
  static constexpr int64_t NK = kKeyBlock;
  static constexpr int64_t MQB = kQueryBlockBwd;
  static constexpr bool kDot = attn_has_dot<V>();

  static inline int64_t padded(int64_t d) { return (d + 15) / 16 * 16; }
  static inline Acc* aligned(void* p) {
    return reinterpret_cast<Acc*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  }
  static inline R ninf() { return V::set1(Acc(-__builtin_inf())); }
  // n (1..W) valid lanes of an opmath row; the others read as `fill`.
  static inline R load_pad(const Acc* p, int n, R fill) {
    return n == W ? V::load(p) : V::where(V::first(n), V::loadn(p, n), fill);
  }

  // ---------------------------------------------------------------- micro-kernel and driver
  // C (MR x NV*W, the last vector `ntail` lanes when TAIL) = or += A B over K steps. fp32 path
  // (TA = Acc): A[r * lda + k * ask] broadcast, B row k at B + k * ldb (TB elements, the tail
  // vector read partially), FMA. bf16 pair path (TA = uint32_t, kDot only): A and the rows of B
  // hold 32-bit bf16 pairs, K counts pairs, B rows are padded scratch (always readable in full
  // vectors), vdpbf16ps.
  // The K products are summed from zero and C is added once at the end (accum), not taken as the
  // start of the chain: the long sums built over many calls (out over key blocks, dK/dV over
  // query blocks, dq over key blocks) are then two-level, each call's K terms and one rounding
  // per call, whose error grows with K + calls instead of K * calls (fp32 attention had 2-3x
  // eager fp32's error at Sq, Sk ~ 1000 from the single chain; same loads, same cost).
  template <int MR, int NV, bool TAIL, class TA, class TB>
  static inline void mk(int64_t K, const TA* A, int64_t lda, int64_t ask, const TB* B, int64_t ldb,
                        Acc* C, int64_t ldc, bool accum, int ntail) {
    constexpr bool kPairs = std::is_same_v<TA, uint32_t>;
    R c[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = V::zero();
    for (int64_t k = 0; k < K; ++k) {
      const TB* bp = B + k * ldb;
      R bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if constexpr (kPairs)
          bv[v] = V::load32(bp + v * W);
        else
          bv[v] = (TAIL && v == NV - 1) ? V::loadn(bp + v * W, ntail) : V::load(bp + v * W);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const TA* ap = A + r * lda + k * ask;
        if constexpr (kPairs) {
          const R av = V::bcast32(ap);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) c[r][v] = V::dot2(c[r][v], av, bv[v]);
        } else {
          const R av = V::set1(*ap);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) c[r][v] = V::fma(av, bv[v], c[r][v]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        Acc* cp = C + r * ldc + v * W;
        if (TAIL && v == NV - 1)
          V::storen(cp, accum ? V::add(V::loadn(cp, ntail), c[r][v]) : c[r][v], ntail);
        else
          V::store(cp, accum ? V::add(V::load(cp), c[r][v]) : c[r][v]);
      }
  }

  // Register blocking: MR rows x NV vectors of C accumulate in registers, with NV vectors of B
  // and one broadcast of A beside them, so MR * NV + NV + 1 must fit the ISA's vector registers:
  // 6 x 4 (29 of AVX-512's 32 zmm), 6 x 2 (15 of AVX2's 16 ymm; 6 x 4 spills there).
  static constexpr int kRegs = [] {
    if constexpr (requires { V::kRegs; })
      return V::kRegs;
    else
      return 16;
  }();
  static constexpr int NVB = kRegs >= 32 ? 4 : 2;

  template <int MR, int NV, class TA, class TB>
  static inline void mk_nv(int nv, bool tail, int64_t K, const TA* A, int64_t lda, int64_t ask,
                           const TB* B, int64_t ldb, Acc* C, int64_t ldc, bool accum, int ntail) {
    if constexpr (NV > 1) {
      if (nv < NV) return mk_nv<MR, NV - 1>(nv, tail, K, A, lda, ask, B, ldb, C, ldc, accum, ntail);
    }
    if (tail) return mk<MR, NV, true>(K, A, lda, ask, B, ldb, C, ldc, accum, ntail);
    return mk<MR, NV, false>(K, A, lda, ask, B, ldb, C, ldc, accum, ntail);
  }

  static constexpr int64_t NB = NVB * W;  // columns of C per register block

  // C (M x N, ldc) = or += A (M x K; A[m * lda + k * ask]) B (K x N), in register blocks of up to
  // 6 rows x NB columns; A and B as in mk (fp32, or bf16 pairs). B's columns [p * NB, p * NB + NB)
  // start at B + p * bpanel, rows ldb apart: row-major B is bpanel = NB (gemm), panel-major
  // (pack_*_panels) ldb = NB (gemm_panels).
  template <class TA, class TB>
  static void gemm_impl(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, int64_t ask,
                        const TB* B, int64_t ldb, int64_t bpanel, Acc* C, int64_t ldc, bool accum) {
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
      const int64_t nn = N - n0 < NB ? N - n0 : NB;
      const int nv = int((nn + W - 1) / W), ntail = int(nn - (nv - 1) * W);
      const bool tail = ntail != W;
      const TB* b = B + (n0 / NB) * bpanel;
      int64_t m = 0;
      for (; m + 6 <= M; m += 6)
        mk_nv<6, NVB>(nv, tail, K, A + m * lda, lda, ask, b, ldb, C + m * ldc + n0, ldc, accum,
                      ntail);
      for (; m + 4 <= M; m += 4)
        mk_nv<4, NVB>(nv, tail, K, A + m * lda, lda, ask, b, ldb, C + m * ldc + n0, ldc, accum,
                      ntail);
      for (; m + 2 <= M; m += 2)
        mk_nv<2, NVB>(nv, tail, K, A + m * lda, lda, ask, b, ldb, C + m * ldc + n0, ldc, accum,
                      ntail);
      for (; m < M; ++m)
        mk_nv<1, NVB>(nv, tail, K, A + m * lda, lda, ask, b, ldb, C + m * ldc + n0, ldc, accum,
                      ntail);
    }
  }
  // B row-major: row k at B + k * ldb.
  template <class TA, class TB>
  static void gemm(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, int64_t ask,
                   const TB* B, int64_t ldb, Acc* C, int64_t ldc, bool accum) {
    gemm_impl(M, N, K, A, lda, ask, B, ldb, NB, C, ldc, accum);
  }
  // B panel-major (pack_kt_panels / pack_v_panels): panel p at B + p * bpanel.
  static void gemm_panels(int64_t M, int64_t N, int64_t K, const Acc* A, int64_t lda, int64_t ask,
                          const Acc* B, int64_t bpanel, Acc* C, int64_t ldc, bool accum) {
    gemm_impl(M, N, K, A, lda, ask, B, NB, bpanel, C, ldc, accum);
  }

  // bf16 pair packings (kDot only). Rows of n bf16 values (D each) copied with a zero pad to an
  // even count: dst row r at dst + r * ld (ld in bf16, even).
  static void pack_rows_bf16(uint16_t* dst, int64_t ld, const bf16_t* src, int64_t stride,
                             int64_t n, int64_t D) {
    for (int64_t r = 0; r < n; ++r) {
      __builtin_memcpy(dst + r * ld, src + r * stride, size_t(D) * 2);
      if (D & 1) dst[r * ld + D] = 0;
    }
  }
  // dst[p * NK + j] = (k_j[2p], k_j[2p + 1]) for pairs p < (D + 1) / 2, keys j < n.
  static void pack_kt_pairs(uint32_t* dst, const bf16_t* src, int64_t stride, int64_t n, int64_t D,
                            int64_t NK) {
    const int64_t D2 = (D + 1) / 2;
    int64_t j0 = 0;
    for (; j0 + 16 <= n; j0 += 16) {
      for (int64_t p0 = 0; p0 < D2; p0 += 16) {
        const int c = D - 2 * p0 < 32 ? int(D - 2 * p0) : 32;
        R r[16];
        for (int x = 0; x < 16; ++x) r[x] = V::load_bf16x32(src + (j0 + x) * stride + 2 * p0, c);
        V::transpose(r);
        const int np = (c + 1) / 2;
        for (int x = 0; x < np; ++x)
          V::store(reinterpret_cast<float*>(dst + (p0 + x) * NK + j0), r[x]);
      }
    }
    for (int64_t j = j0; j < n; ++j) {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(src + j * stride);
      for (int64_t q = 0; q < D2; ++q) {
        const uint32_t lo = p[2 * q], hi = 2 * q + 1 < D ? p[2 * q + 1] : 0;
        dst[q * NK + j] = lo | (hi << 16);
      }
    }
  }
  // dst[jp * ldd + d] = (v_{2jp}[d], v_{2jp+1}[d]) for jp < (n + 1) / 2 (a missing key: 0),
  // d < padded(D) (zeros past D).
  static void pack_v_pairs(uint32_t* dst, int64_t ldd, const bf16_t* src, int64_t stride, int64_t n,
                           int64_t D) {
    for (int64_t jp = 0; jp < (n + 1) / 2; ++jp) {
      const bf16_t* a = src + 2 * jp * stride;
      const bf16_t* b = 2 * jp + 1 < n ? a + stride : nullptr;
      for (int64_t d0 = 0; d0 < D; d0 += 16)
        V::interleave16(dst + jp * ldd + d0, a + d0, b ? b + d0 : nullptr,
                        D - d0 < 16 ? int(D - d0) : 16);
    }
  }

  // ---------------------------------------------------------------- packing
  // dst[r * ldd + d] = mul * src_row(r)[d], d < D (opmath), for n rows at src + r * stride.
  template <class T>
  static void pack_rows(Acc* dst, int64_t ldd, const T* src, int64_t stride, int64_t n, int64_t D,
                        Acc mul) {
    const R s = V::set1(mul);
    for (int64_t r = 0; r < n; ++r) {
      const T* p = src + r * stride;
      Acc* o = dst + r * ldd;
      int64_t d = 0;
      for (; d + W <= D; d += W) V::store(o + d, V::mul(V::load(p + d), s));
      if (d < D) V::storen(o + d, V::mul(V::loadn(p + d, int(D - d)), s), int(D - d));
    }
  }
  // Transposed: dst[d * NK + j] = src_row(j)[d] for j < n keys, W x W blocks transposed in
  // registers where the ISA offers it (V::transpose).
  template <class T>
  static void pack_t(Acc* dst, const T* src, int64_t stride, int64_t n, int64_t D, int64_t NK) {
    int64_t j0 = 0;
    if constexpr (requires { V::kTranspose; }) {
      for (; j0 + W <= n; j0 += W) {
        for (int64_t d0 = 0; d0 < D; d0 += W) {
          const int c = D - d0 < W ? int(D - d0) : W;
          R r[W];
          for (int x = 0; x < W; ++x)
            r[x] = c == W ? V::load(src + (j0 + x) * stride + d0)
                          : V::loadn(src + (j0 + x) * stride + d0, c);
          V::transpose(r);
          for (int x = 0; x < c; ++x) V::store(dst + (d0 + x) * NK + j0, r[x]);
        }
      }
    }
    for (int64_t j = j0; j < n; ++j) {
      const T* p = src + j * stride;
      for (int64_t d = 0; d < D; ++d) dst[d * NK + j] = Acc(attn_elem(p + d));
    }
  }
  // Panel-major copies for gemm_panels, panels of NB = NVB * W columns, rows NB values apart and
  // read front to back (no power-of-two row stride to thrash a cache set). K^T of n keys:
  // dst[(j / NB) * D * NB + d * NB + j % NB] = k_j[d]. V of n keys: dst[(d / NB) * pstride +
  // j * NB + d % NB] = v_j[d], zeros for d in [D, round_up(D, NB)).
  // Keys [j_off, j_off + n) of the block (a paged segment: j_off > 0), never crossing a panel.
  template <class T>
  static void pack_kt_panels(Acc* dst, const T* src, int64_t stride, int64_t n, int64_t D,
                             int64_t j_off = 0) {
    for (int64_t j0 = 0; j0 < n;) {
      const int64_t j = j_off + j0, c = n - j0 < NB - j % NB ? n - j0 : NB - j % NB;
      pack_t(dst + (j / NB) * D * NB + j % NB, src + j0 * stride, stride, c, D, NB);
      j0 += c;
    }
  }
  template <class T>
  static void pack_v_panels(Acc* dst, int64_t pstride, const T* src, int64_t stride, int64_t n,
                            int64_t D) {
    for (int64_t j = 0; j < n; ++j) {
      const T* p = src + j * stride;
      for (int64_t d = 0; d < D; d += W) {
        Acc* o = dst + (d / NB) * pstride + j * NB + d % NB;
        V::store(o, D - d < W ? V::loadn(p + d, int(D - d)) : V::load(p + d));
      }
      for (int64_t d = (D + W - 1) / W * W; d % NB != 0; d += W)
        V::store(dst + (d / NB) * pstride + j * NB + d % NB, V::zero());
    }
  }

  // ---------------------------------------------------------------- per-sequence keys
  // The arguments as batch b sees them: with per-sequence lengths (seqlen_k), its own key count
  // and bottom-right causal offset in tmp; otherwise a itself.
  static inline const AttnArgs& for_batch(const AttnArgs& a, int64_t b, AttnArgs& tmp) {
    if (a.seqlen_k == nullptr) return a;
    tmp = a;
    tmp.Sk = a.seqlen_k[b];
    tmp.causal_offset = tmp.Sk - a.Sq;
    return tmp;
  }
  // Row j of (b, hkv)'s keys (base k or v, strides str) and in run the rows that follow it
  // contiguously (str[2] apart): the rest of its cache block when paged, else all.
  template <class T>
  static inline const T* kv_row(const AttnArgs& a, const void* base, const int64_t* str, int64_t b,
                                int64_t hkv, int64_t j, int64_t& run) {
    const T* p = static_cast<const T*>(base) + hkv * str[1];
    if (a.block_table == nullptr) {
      run = INT64_MAX / 4;
      return p + b * str[0] + j * str[2];
    }
    const int64_t r = j & (a.page - 1);
    run = a.page - r;
    return p + int64_t(a.block_table[b * a.bt_stride + j / a.page]) * str[0] + r * str[2];
  }

  // ---------------------------------------------------------------- score-tile helpers
  // s[0, n) += mask row (m: the row's start, stride along keys ms).
  template <class TM>
  static void add_mask(Acc* s, const TM* m, int64_t ms, int64_t n) {
    if (ms == 1) {
      for (int64_t j = 0; j < n; j += W) {
        const int c = n - j < W ? int(n - j) : W;
        V::store(s + j, V::add(V::load(s + j), V::loadn(m + j, c)));
      }
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += Acc(attn_elem(m + j * ms));
    }
  }
  // The visible keys of query row i: [first_key(i), last_key(i)] (before clamping to the keys).
  static inline int64_t first_key(const AttnArgs& a, int64_t i) {
    return a.win_left >= 0 ? i + a.causal_offset - a.win_left : INT64_MIN / 2;
  }
  static inline int64_t last_key(const AttnArgs& a, int64_t i) {
    return a.win_right >= 0 ? i + a.causal_offset + a.win_right : INT64_MAX / 2;
  }
  // Softcap of a tile: s = c * tanh(s / c) for rows of n scores lds apart; the tanh values are
  // kept in t (same layout) when t is not null, for the backward's derivative 1 - tanh^2.
  static void softcap_tile(const AttnArgs& a, Acc* s, Acc* t, int64_t rows, int64_t n,
                           int64_t lds) {
    const R c = V::set1(Acc(a.softcap)), ic = V::set1(Acc(1.0 / a.softcap));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; j += W) {
        const int w = n - j < W ? int(n - j) : W;
        const R th = vtanh<V>(V::mul(V::loadn(s + r * lds + j, w), ic));
        V::storen(s + r * lds + j, V::mul(th, c), w);
        if (t != nullptr) V::storen(t + r * lds + j, th, w);
      }
  }
  // Scores of tile row (b, h, i) for keys [jb, jb + n), after the softcap: ALiBi bias, mask and
  // the window / causal limits applied.
  template <class TM>
  static void finish_scores(const AttnArgs& a, Acc* s, int64_t b, int64_t h, int64_t i, int64_t jb,
                            int64_t n) {
    if (a.alibi != nullptr) {
      const Acc slope = static_cast<const Acc*>(a.alibi)[b * a.alibi_str[0] + h * a.alibi_str[1]];
      const Acc d0 = Acc(i + a.causal_offset - jb);  // the diagonal's key, tile-relative
      for (int64_t j = 0; j < n; ++j) {
        const Acc d = d0 - Acc(j);
        s[j] -= slope * (d < 0 ? -d : d);
      }
    }
    if constexpr (!AttnSame<TM, NoMask>::value) {
      const TM* m = static_cast<const TM*>(a.mask) + b * a.mask_str[0] + h * a.mask_str[1] +
                    i * a.mask_str[2] + jb * a.mask_str[3];
      add_mask(s, m, a.mask_str[3], n);
    }
    const int64_t lo = first_key(a, i) - jb, hi = last_key(a, i) - jb;
    for (int64_t j = 0; j < (lo < n ? lo : n); ++j) s[j] = Acc(-__builtin_inf());
    for (int64_t j = hi + 1 < 0 ? 0 : hi + 1; j < n; ++j) s[j] = Acc(-__builtin_inf());
  }
  static inline uint32_t drop_row(const AttnArgs& a, int64_t b, int64_t h, int64_t i) {
    return attn_mix32(uint32_t(uint64_t((b * a.H + h) * a.Sq + i)) ^ a.seed0);
  }
  static inline bool keep(const AttnArgs& a, uint32_t row_hash, int64_t j) {
    return (attn_mix32(row_hash ^ uint32_t(uint64_t(j) + a.seed1)) >> 8) >= a.thr;
  }

  // ---------------------------------------------------------------- forward
  static constexpr int64_t NF = kFwdKeyBlock;
  // bf16 pair path: Q (unscaled, as given), K^T, P and V as bf16 pairs; scale applied to S.
  // bf16 only: fp16 data take the fp32 products on every tier, converted as K/V are packed (or
  // loaded, on the decode path), as bf16 does without AVX512_BF16.
  template <class T>
  static constexpr bool dot_for() {
    return kDot && AttnSame<T, bf16_t>::value;
  }

  // One key block [jb, jb + n) of kv head (b, hkv) in the layout fwd reads: K^T panels (D * NF
  // opmath values) then V panels (round_up(Dv, NB) * NF), or with bf16 pairs K^T pairs (D2 rows
  // of NF) then V pairs (NF / 2 rows of padded(Dv)).
  template <class T>
  static void pack_block(const AttnArgs& a, int64_t b, int64_t hkv, int64_t jb, int64_t n,
                         Acc* dst) {
    const int64_t D = a.D, D2 = (D + 1) / 2, Dv = a.Dv;
    // One contiguous run of rows at a time: the whole block, or (paged) each cache block's
    // part of it, which starts at an even key (page >= 16).
    for (int64_t j = 0, run; j < n; j += run) {
      const T* kp = kv_row<T>(a, a.k, a.k_str, b, hkv, jb + j, run);
      const T* vp = kv_row<T>(a, a.v, a.v_str, b, hkv, jb + j, run);
      if (run > n - j) run = n - j;
      if constexpr (dot_for<T>()) {
        uint32_t* kt = reinterpret_cast<uint32_t*>(dst);
        pack_kt_pairs(kt + j, kp, a.k_str[2], run, D, NF);
        pack_v_pairs(kt + D2 * NF + j / 2 * padded(Dv), padded(Dv), vp, a.v_str[2], run, Dv);
      } else {
        pack_kt_panels(dst, kp, a.k_str[2], run, D, j);
        pack_v_panels(dst + D * NF + j * NB, NF * NB, vp, a.v_str[2], run, Dv);
      }
    }
  }
  // Key block kbi of (b, hkv) into dst (attn_fwd_block_elems(D) opmath values).
  template <class T>
  static void pack_kv(const AttnArgs& a_in, int64_t b, int64_t hkv, int64_t kbi, void* dst) {
    AttnArgs tmp;
    const AttnArgs& a = for_batch(a_in, b, tmp);
    const int64_t jb = kbi * NF, n = a.Sk - jb < NF ? a.Sk - jb : NF;
    if (n <= 0) return;  // past this sequence's keys (paged: the batch's longest sets nkb)
    pack_block<T>(a, b, hkv, jb, n, static_cast<Acc*>(dst));
  }

  // Decode path: up to kDirectRows query rows, K and V read in place (attention_kernels.h).
  static constexpr int64_t kDirectRows = 8;
  // Whether fwd takes that path for this call: G * Sq <= kDirectRows makes the work item every
  // query row of the group in one block, hence nothing packed ahead (attention.cpp). The backward
  // then recomputes the scores the same way, bit for bit: a row's P = exp(s - lse) is exactly 1
  // where it has one visible key, as the exact P is.
  template <class T>
  static inline bool fwd_direct(const AttnArgs& a) {
    return !dot_for<T>() && (a.H / a.Hkv) * a.Sq <= kDirectRows;
  }
  static constexpr int64_t kDirectKeys = 32;
  // Keys per step of scores_direct: KJ keys x 4 rows of accumulators, the KJ key vectors and a
  // query vector in registers (AVX2: 8 + 2 + 1 of 16; AVX-512: 16 + 4 + 1 of 32).
  static constexpr int KJ = kRegs >= 32 ? 4 : 2;
  static constexpr int64_t kDirectAhead = 16;  // keys (8 KiB of fp32 K at head_dim 128)

  // Asks for the cache lines of n elements at p (a hint: never faults, even past the tensor),
  // into L1 (or, L2, into L2 only).
  template <class T, bool L2 = false>
  static inline void prefetch_row(const T* p, int64_t n) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t o = 0; o < n * int64_t(sizeof(T)); o += 64)
      __builtin_prefetch(c + o, 0, L2 ? 2 : 3);
  }
  // S[r * lds + j] = Q_r . k_j for r < rows, keys j < n (rows of k at kp + j * ks, T as given;
  // Q opmath rows ld apart, D valid values each): dot products along head_dim, KJ keys and NR
  // rows at a time, each key vector loaded (and converted) once for NR rows. Each score's bits
  // depend on its row and key only (not on NR or the tile), so the backward can recompute them.
  template <int NR, class T>
  static inline void scores_direct_rows(int64_t n, int64_t D, const Acc* Q, int64_t ld, const T* kp,
                                        int64_t ks, Acc* S, int64_t lds, int64_t pf, const T* nxt) {
    for (int64_t j = 0; j < n; j += KJ) {
      const int nj = n - j < KJ ? int(n - j) : KJ;
      const T* kr[KJ];
      for (int x = 0; x < KJ; ++x) kr[x] = kp + (j + (x < nj ? x : 0)) * ks;
      // The hardware prefetchers leave this stream latency-bound here (Zen 3: 3 GB/s of the
      // 9 a plain sum reads at): ask for the rows kDirectAhead keys ahead.
      // Paged: row r >= pf of the stream is row r - pf of the next cache block, at nxt.
      for (int x = 0; x < KJ; ++x) {
        const int64_t r = j + kDirectAhead + x;
        if (r < pf)
          prefetch_row(kp + r * ks, D);
        else if (nxt != nullptr)
          prefetch_row(nxt + (r - pf) * ks, D);
      }
      R acc[NR][KJ];
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
        for (int x = 0; x < KJ; ++x) acc[r][x] = V::zero();
      int64_t d = 0;
      for (; d + W <= D; d += W) {
        R kv[KJ];
#pragma GCC unroll 4
        for (int x = 0; x < KJ; ++x) kv[x] = V::load(kr[x] + d);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
          const R qv = V::load(Q + r * ld + d);
#pragma GCC unroll 4
          for (int x = 0; x < KJ; ++x) acc[r][x] = V::fma(qv, kv[x], acc[r][x]);
        }
      }
      if (d < D) {
        const int c = int(D - d);
        R kv[KJ];
        for (int x = 0; x < KJ; ++x) kv[x] = V::loadn(kr[x] + d, c);
        for (int r = 0; r < NR; ++r) {
          const R qv = V::loadn(Q + r * ld + d, c);
          for (int x = 0; x < KJ; ++x) acc[r][x] = V::fma(qv, kv[x], acc[r][x]);
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int x = 0; x < nj; ++x) S[r * lds + j + x] = V::hsum(acc[r][x]);
    }
  }
  template <class T>
  static void scores_direct(int64_t rows, int64_t n, int64_t D, const Acc* Q, int64_t ld,
                            const T* kp, int64_t ks, Acc* S, int64_t lds, int64_t pf,
                            const T* nxt) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
      scores_direct_rows<4>(n, D, Q + r * ld, ld, kp, ks, S + r * lds, lds, pf, nxt);
    switch (rows - r) {
      case 3:
        return scores_direct_rows<3>(n, D, Q + r * ld, ld, kp, ks, S + r * lds, lds, pf, nxt);
      case 2:
        return scores_direct_rows<2>(n, D, Q + r * ld, ld, kp, ks, S + r * lds, lds, pf, nxt);
      case 1:
        return scores_direct_rows<1>(n, D, Q + r * ld, ld, kp, ks, S + r * lds, lds, pf, nxt);
      default:
        return;
    }
  }

  template <class T, class TM>
  static void fwd(const AttnArgs& a_in, int64_t b, int64_t hkv, int64_t i0, int64_t i1, int64_t j0,
                  int64_t j1, const void* packed, void* part_v, void* scratch) {
    AttnArgs tmp;
    const AttnArgs& a = for_batch(a_in, b, tmp);
    constexpr bool dot = dot_for<T>();
    const int64_t G = a.H / a.Hkv, mq = i1 - i0, rows = G * mq, D = a.D, Dp = padded(D);
    const int64_t Dv = a.Dv, Dvp = padded(Dv), Dmp = padded(D > Dv ? D : Dv);
    const int64_t D2 = (D + 1) / 2, rp = padded(rows), blk = attn_fwd_block_elems(D, Dv);
    Acc* Qs = aligned(scratch);
    Acc* O = Qs + rows * Dmp;  // rows of Dvp
    Acc* KT = O + rows * Dmp;  // one packed block (pack_block), when not given packed
    Acc* S = KT + blk;
    Acc* mx = S + rows * NF;  // running max, sum; this block's max, rescale factor
    Acc* sm = mx + rp;
    Acc* bm = sm + rp;
    Acc* al = bm + rp;
    uint32_t* Pb = reinterpret_cast<uint32_t*>(al + rp);
    const Acc* pk = static_cast<const Acc*>(packed);
    // Decode-sized items (a few query rows, blocks not packed ahead) read K and V as they are:
    // packing a block would cost more than the few rows' products with it.
    const bool direct = !dot && pk == nullptr && rows <= kDirectRows;  // iff fwd_direct(a)
    for (int64_t g = 0; g < G; ++g) {
      const T* qp = static_cast<const T*>(a.q) + b * a.q_str[0] + (hkv * G + g) * a.q_str[1] +
                    i0 * a.q_str[2];
      if constexpr (dot)
        pack_rows_bf16(reinterpret_cast<uint16_t*>(Qs) + g * mq * 2 * D2, 2 * D2, qp, a.q_str[2],
                       mq, D);
      else
        pack_rows(Qs + g * mq * Dp, Dp, qp, a.q_str[2], mq, D, Acc(a.scale));
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < Dvp; d += W) V::store(O + r * Dvp + d, V::zero());
      mx[r] = Acc(-__builtin_inf());
      sm[r] = 0;
    }
    // The key blocks that some row of [i0, i1) sees (a window skips the others): from the block
    // of the first row's first key to the last row's last key.
    int64_t jend = j1 < a.Sk ? j1 : a.Sk, jstart = j0;  // (a.Sk: this sequence's keys)
    if (last_key(a, i1 - 1) + 1 < jend) jend = last_key(a, i1 - 1) + 1;
    if (first_key(a, i0) > jstart) jstart = first_key(a, i0) / NF * NF;
    const R ninfv = ninf(), sc = V::set1(Acc(a.scale));
    for (int64_t jb = jstart; jb < jend; jb += NF) {
      const int64_t n = jend - jb < NF ? jend - jb : NF;
      const Acc* kt = KT;
      if (direct)
        for (int64_t j = 0, run; j < n; j += run) {  // each contiguous run of key rows
          const T* kp = kv_row<T>(a, a.k, a.k_str, b, hkv, jb + j, run);
          const int64_t left = run;  // rows to the end of its cache block (dense: all)
          // Paged: the stream's rows past this block are the next block's (prefetched ahead).
          const T* nxt = nullptr;
          if (a.block_table != nullptr && jb + j + left < a.Sk) {
            int64_t r2;
            nxt = kv_row<T>(a, a.k, a.k_str, b, hkv, jb + j + left, r2);
          }
          if (run > n - j) run = n - j;
          scores_direct(rows, run, D, Qs, Dp, kp, a.k_str[2], S + j, NF,
                        a.block_table ? left : INT64_MAX, nxt);
        }
      else if (pk != nullptr)
        kt = pk + (jb / NF) * blk;
      else
        pack_block<T>(a, b, hkv, jb, n, KT);
      if constexpr (dot)
        gemm(rows, n, D2, reinterpret_cast<const uint32_t*>(Qs), D2, 1,
             reinterpret_cast<const uint32_t*>(kt), NF, S, NF, false);
      else if (!direct)
        gemm_panels(rows, n, D, Qs, Dp, 1, kt, D * NB, S, NF, false);
      if constexpr (dot)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < n; j += W)
            V::store(S + r * NF + j, V::mul(V::load(S + r * NF + j), sc));
      if (a.softcap > 0) softcap_tile(a, S, nullptr, rows, n, NF);
      // Scores and the block max of each row.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / mq, i = i0 + r % mq, h = hkv * G + g;
        Acc* s = S + r * NF;
        finish_scores<TM>(a, s, b, h, i, jb, n);
        R vm = ninfv;
        for (int64_t j = 0; j < n; j += W)
          vm = V::max(vm, load_pad(s + j, n - j < W ? int(n - j) : W, ninfv));
        bm[r] = V::hmax(vm);
      }
      // New maxima and rescale factors, W rows at a time (no visible key yet: factor 1).
      for (int64_t r = 0; r < rows; r += W) {
        const R mo = V::load(mx + r), mn = V::max(V::load(bm + r), mo);
        const R f = vexp<V>(V::sub(mo, mn));
        V::store(al + r, V::where(V::eq(mn, ninfv), V::set1(Acc(1)), f));
        V::store(mx + r, mn);
      }
      for (int64_t r = 0; r < rows; ++r) {
        Acc* s = S + r * NF;
        const Acc mnew = mx[r];
        if (mnew == Acc(-__builtin_inf())) {  // nothing visible yet in this row
          // ... or only NaN scores, which the max dropped: they poison the row (as in the
          // reference) instead of making it look fully masked.
          bool nan = false;
          for (int64_t j = 0; j < n; ++j) nan |= s[j] != s[j];
          if (nan) sm[r] = Acc(__builtin_nan(""));
          for (int64_t j = 0; j < n; j += W) V::store(s + j, V::zero());
          continue;
        }
        const R mv = V::set1(mnew);
        R vs = V::zero();
        for (int64_t j = 0; j < n; j += W) {
          const R p = vexp<V>(V::sub(load_pad(s + j, n - j < W ? int(n - j) : W, ninfv), mv));
          vs = V::add(vs, p);
          V::store(s + j, p);
        }
        const Acc alpha = al[r];
        sm[r] = sm[r] * alpha + V::hsum(vs);
        if (alpha != Acc(1)) {
          const R av = V::set1(alpha);
          for (int64_t d = 0; d < Dvp; d += W)
            V::store(O + r * Dvp + d, V::mul(V::load(O + r * Dvp + d), av));
        }
        if (a.dropout) {
          const int64_t g = r / mq, i = i0 + r % mq, h = hkv * G + g;
          const uint32_t rh = drop_row(a, b, h, i);
          const Acc ds = Acc(a.drop_scale);
          for (int64_t j = 0; j < n; ++j) s[j] = keep(a, rh, jb + j) ? s[j] * ds : Acc(0);
        }
      }
      if constexpr (dot) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < n; j += 32)
            V::to_bf16x32(reinterpret_cast<uint16_t*>(Pb + r * (NF / 2)) + j, S + r * NF + j,
                          n - j < 32 ? int(n - j) : 32);
        gemm(rows, Dv, (n + 1) / 2, Pb, NF / 2, 1, reinterpret_cast<const uint32_t*>(kt) + D2 * NF,
             Dvp, O, Dvp, true);
      } else if (direct) {
        // V as it is, kDirectKeys rows at a time, so the rows every register block reads stay
        // in L1 across the blocks of D.
        for (int64_t k0 = 0, kn; k0 < n; k0 += kn) {  // (paged: within one cache block)
          const T* vp = kv_row<T>(a, a.v, a.v_str, b, hkv, jb + k0, kn);
          if (kn > n - k0) kn = n - k0;
          if (kn > kDirectKeys) kn = kDirectKeys;
          // The next chunk's rows (see scores_direct): dense, the rows after these; paged, that
          // chunk's own rows (its cache block may be anywhere), when this tile has one.
          if (a.block_table == nullptr) {
            for (int64_t x = 0; x < kDirectKeys; ++x) prefetch_row(vp + (kn + x) * a.v_str[2], Dv);
          } else if (k0 + kn < n) {
            int64_t r2;
            const T* nx = kv_row<T>(a, a.v, a.v_str, b, hkv, jb + k0 + kn, r2);
            for (int64_t x = 0; x < kDirectKeys && x < r2; ++x)
              prefetch_row(nx + x * a.v_str[2], Dv);
          }
          gemm(rows, Dv, kn, S + k0, NF, 1, vp, a.v_str[2], O, Dvp, true);
        }
      } else {
        gemm_panels(rows, Dv, n, S, NF, 1, kt + D * NF, NF * NB, O, Dvp, true);
      }
    }
    if (part_v != nullptr) {
      Acc* part = static_cast<Acc*>(part_v);
      for (int64_t r = 0; r < rows; ++r) {
        Acc* p = part + r * (Dv + 2);
        p[0] = mx[r];
        p[1] = sm[r];
        for (int64_t d = 0; d < Dv; ++d) p[2 + d] = O[r * Dvp + d];
      }
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / mq, i = i0 + r % mq, h = hkv * G + g;
      const int64_t row = (b * a.H + h) * a.Sq + i;
      write_row<T>(a, row, h, O + r * Dvp, mx[r], sm[r]);
    }
  }

  // out row = o / l, lse = m + log(l); l == 0 (no visible key): 0 and -inf. With sinks, the
  // head's sink joins the denominator: lse' = log(e^lse + e^sink), out = o * exp(m - lse').
  template <class T>
  static void write_row(const AttnArgs& a, int64_t row, int64_t h, const Acc* o, Acc m, Acc l) {
    const int64_t Dv = a.Dv;
    // row = (b * H + h) * Sq + i; seq-major out: ((b * Sq + i) * H + h) * Dv.
    const int64_t orow = a.out_seq_major ? (row / (a.H * a.Sq) * a.Sq + row % a.Sq) * a.H + h : row;
    T* out = static_cast<T*>(a.out) + orow * Dv;
    const bool dead = l == Acc(0);  // a NaN sum (a NaN score) gives NaN, not zeros
    double lse = dead ? -__builtin_inf() : double(m) + __builtin_log(double(l));
    Acc mul = dead ? Acc(0) : Acc(1) / l;
    if (a.sinks != nullptr) {
      const double sk = double(static_cast<const Acc*>(a.sinks)[h]);
      const double hi = lse > sk ? lse : sk;  // (a NaN lse stays NaN below)
      if (hi != -__builtin_inf()) {
        lse = hi + __builtin_log(__builtin_exp(lse - hi) + __builtin_exp(sk - hi));
        mul = dead ? Acc(0) : Acc(__builtin_exp(double(m) - lse));
      }
    }
    const R sc = V::set1(mul);
    int64_t d = 0;
    for (; d + W <= Dv; d += W) V::store(out + d, V::mul(V::load(o + d), sc));
    if (d < Dv) V::storen(out + d, V::mul(V::loadn(o + d, int(Dv - d)), sc), int(Dv - d));
    static_cast<Acc*>(a.lse)[row] = Acc(lse);
  }

  template <class T>
  static void merge(const AttnArgs& a, int64_t b, int64_t hkv, int64_t i0, int64_t i1,
                    const void* part_v, int64_t nsplit, int64_t pstride) {
    const int64_t G = a.H / a.Hkv, mq = i1 - i0, rows = G * mq, D = a.Dv;
    const Acc* part = static_cast<const Acc*>(part_v);
    Acc o[256 + 16];
    for (int64_t r = 0; r < rows; ++r) {
      Acc m = Acc(-__builtin_inf());
      for (int64_t c = 0; c < nsplit; ++c) {
        const Acc mc = part[c * pstride + r * (D + 2)];
        m = mc > m ? mc : m;
      }
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      Acc l = 0;
      for (int64_t c = 0; c < nsplit; ++c) {  // a NaN partial sum poisons the row
        const Acc lc = part[c * pstride + r * (D + 2) + 1];
        if (lc != lc) l = lc;
      }
      if (l == Acc(0) && m != Acc(-__builtin_inf())) {
        for (int64_t c = 0; c < nsplit; ++c) {
          const Acc* p = part + c * pstride + r * (D + 2);
          if (p[0] == Acc(-__builtin_inf())) continue;
          const Acc w = Acc(__builtin_exp(double(p[0] - m)));
          l += p[1] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += p[2 + d] * w;
        }
      }
      const int64_t g = r / mq, i = i0 + r % mq, h = hkv * G + g;
      write_row<T>(a, (b * a.H + h) * a.Sq + i, h, o, m, l);
    }
  }

  // ---------------------------------------------------------------- backward
  template <class T>
  static void delta(const AttnArgs& a, int64_t r0, int64_t r1) {
    const int64_t D = a.Dv;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % a.Sq, bh = r / a.Sq, h = bh % a.H, b = bh / a.H;
      const T* g =
          static_cast<const T*>(a.dout) + b * a.do_str[0] + h * a.do_str[1] + i * a.do_str[2];
      const T* o = static_cast<const T*>(a.o) + b * a.o_str[0] + h * a.o_str[1] + i * a.o_str[2];
      R acc = V::zero();
      int64_t d = 0;
      for (; d + W <= D; d += W) acc = V::fma(V::load(g + d), V::load(o + d), acc);
      if (d < D) acc = V::fma(V::loadn(g + d, int(D - d)), V::loadn(o + d, int(D - d)), acc);
      static_cast<Acc*>(a.delta)[r] = V::hsum(acc);
    }
  }

  // bf16 rows r0, r0 + 1 of a (rows, NK) bf16 tile interleaved into pairs along rows:
  // dst[ip * ldd + j] = (src[2ip][j], src[2ip + 1][j]) for j < n (a missing row: 0).
  static void pair_rows(uint32_t* dst, int64_t ldd, const uint16_t* src, int64_t lds, int64_t rows,
                        int64_t n) {
    for (int64_t ip = 0; ip < (rows + 1) / 2; ++ip) {
      const bf16_t* x = reinterpret_cast<const bf16_t*>(src + 2 * ip * lds);
      const bf16_t* y = 2 * ip + 1 < rows ? x + lds : nullptr;
      for (int64_t j = 0; j < n; j += 16)
        V::interleave16(dst + ip * ldd + j, x + j, y ? y + j : nullptr,
                        n - j < 16 ? int(n - j) : 16);
    }
  }

  template <class T, class TM>
  static void bwd(const AttnArgs& a, int64_t b, int64_t hkv, int64_t j0, int64_t j1, void* dq_acc_v,
                  void* scratch) {
    // bf16 pairs: S = Q K^T and dP = dO V^T over pairs along head_dim (K^T, V^T packed so);
    // dV += P^T dO and dK += dS^T Q over pairs along query rows; dq += dS K over pairs along keys.
    constexpr bool dot = dot_for<T>();
    const int64_t G = a.H / a.Hkv, D = a.D, Dp = padded(D), D2 = (D + 1) / 2;
    const int64_t Dv = a.Dv, Dvp = padded(Dv), Dv2 = (Dv + 1) / 2;
    const int64_t Dm = padded(D > Dv ? D : Dv);  // the tiles' room: q/k rows Dp, v rows Dvp
    Acc* Qs = aligned(scratch);
    Acc* dOs = Qs + MQB * Dm;
    Acc* KT = dOs + MQB * Dm;
    Acc* VT = KT + Dm * NK;
    Acc* S = VT + Dm * NK;
    Acc* dP = S + MQB * NK;
    Acc* dK = dP + MQB * NK;
    Acc* dV = dK + NK * Dm;
    // dot only: carved out of the regions above, and the tiles after dV.
    uint32_t* Qb = reinterpret_cast<uint32_t*>(Qs);  // Q pairs along d (MQB x D2)
    uint32_t* Qi = Qb + MQB * Dm / 2;                // Q pairs along rows (MQB/2 x Dp)
    uint32_t* dOb = reinterpret_cast<uint32_t*>(dOs);
    uint32_t* dOi = dOb + MQB * Dm / 2;
    uint32_t* KTp = reinterpret_cast<uint32_t*>(KT);  // K^T pairs along d (D2 x NK)
    uint32_t* Kj = KTp + Dm * NK / 2;                 // K pairs along keys (NK/2 x Dp)
    uint32_t* VTp = reinterpret_cast<uint32_t*>(VT);
    uint32_t* P16 = reinterpret_cast<uint32_t*>(dV + NK * Dm);  // P rows, bf16 (MQB x NK/2)
    uint32_t* dS16 = P16 + MQB * NK / 2;
    uint32_t* PT = dS16 + MQB * NK / 2;  // P pairs along rows (MQB/2 x NK)
    uint32_t* dST = PT + MQB * NK / 2;
    Acc* Th = reinterpret_cast<Acc*>(dST + MQB * NK / 2);  // softcap: tanh of the scores
    Acc* dq_acc = static_cast<Acc*>(dq_acc_v);
    const T* kp = static_cast<const T*>(a.k) + b * a.k_str[0] + hkv * a.k_str[1];
    const T* vp = static_cast<const T*>(a.v) + b * a.v_str[0] + hkv * a.v_str[1];
    const Acc* lse = static_cast<const Acc*>(a.lse_in);
    const Acc* dlt = static_cast<const Acc*>(a.delta);
    const Acc dsc = Acc(a.drop_scale);
    const bool direct = fwd_direct<T>(a);  // scores as the forward computed them
    for (int64_t kb = j0; kb < j1; kb += NK) {
      const int64_t n = j1 - kb < NK ? j1 - kb : NK;
      if constexpr (dot) {
        pack_kt_pairs(KTp, kp + kb * a.k_str[2], a.k_str[2], n, D, NK);
        pack_kt_pairs(VTp, vp + kb * a.v_str[2], a.v_str[2], n, Dv, NK);
        pack_v_pairs(Kj, Dp, kp + kb * a.k_str[2], a.k_str[2], n, D);
      } else {
        if (!direct) pack_t(KT, kp + kb * a.k_str[2], a.k_str[2], n, D, NK);
        pack_t(VT, vp + kb * a.v_str[2], a.v_str[2], n, Dv, NK);
      }
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t d = 0; d < Dp; d += W) V::store(dK + j * Dp + d, V::zero());
        for (int64_t d = 0; d < Dvp; d += W) V::store(dV + j * Dvp + d, V::zero());
      }
      // The query rows that see some key of [kb, kb + n) (window and causal limits).
      int64_t istart = 0, iend = a.Sq;
      if (a.win_right >= 0 && kb - a.causal_offset - a.win_right > 0)
        istart = kb - a.causal_offset - a.win_right;
      if (a.win_left >= 0 && kb + n - a.causal_offset + a.win_left < iend)
        iend = kb + n - a.causal_offset + a.win_left;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hkv * G + g;
        for (int64_t ib = istart; ib < iend; ib += MQB) {
          const int64_t mq = iend - ib < MQB ? iend - ib : MQB, mq2 = (mq + 1) / 2;
          const T* qp =
              static_cast<const T*>(a.q) + b * a.q_str[0] + h * a.q_str[1] + ib * a.q_str[2];
          const T* gp =
              static_cast<const T*>(a.dout) + b * a.do_str[0] + h * a.do_str[1] + ib * a.do_str[2];
          if constexpr (dot) {
            pack_rows_bf16(reinterpret_cast<uint16_t*>(Qb), 2 * D2, qp, a.q_str[2], mq, D);
            pack_rows_bf16(reinterpret_cast<uint16_t*>(dOb), 2 * Dv2, gp, a.do_str[2], mq, Dv);
            gemm(mq, n, D2, Qb, D2, 1, KTp, NK, S, NK, false);
            gemm(mq, n, Dv2, dOb, Dv2, 1, VTp, NK, dP, NK, false);
            const R sc = V::set1(Acc(a.scale));
            for (int64_t r = 0; r < mq; ++r)
              for (int64_t j = 0; j < n; j += W)
                V::store(S + r * NK + j, V::mul(V::load(S + r * NK + j), sc));
          } else {
            pack_rows(Qs, Dp, qp, a.q_str[2], mq, D, Acc(a.scale));
            pack_rows(dOs, Dvp, gp, a.do_str[2], mq, Dv, Acc(1));
            if (direct)
              scores_direct(mq, n, D, Qs, Dp, kp + kb * a.k_str[2], a.k_str[2], S, NK, INT64_MAX,
                            static_cast<const T*>(nullptr));
            else
              gemm(mq, n, D, Qs, Dp, 1, KT, NK, S, NK, false);
            gemm(mq, n, Dv, dOs, Dvp, 1, VT, NK, dP, NK, false);
          }
          if (a.softcap > 0) softcap_tile(a, S, Th, mq, n, NK);
          for (int64_t r = 0; r < mq; ++r) {
            const int64_t i = ib + r, row = (b * a.H + h) * a.Sq + i;
            Acc* s = S + r * NK;
            Acc* dp = dP + r * NK;
            const Acc l = lse[row];
            if (l == Acc(-__builtin_inf())) {  // no visible key: P = 0, dS = 0
              for (int64_t j = 0; j < n; j += W) {
                V::store(s + j, V::zero());
                V::store(dp + j, V::zero());
              }
            } else {
              finish_scores<TM>(a, s, b, h, i, kb, n);
              // dS = P (dP - delta). Where P computes to exactly 1 (a row's only visible key:
              // the other P underflow or are masked) the exact dS is dP - dP = 0, within fp32
              // rounding of it for any P that rounds to 1; dP and delta = dO . O are summed in
              // different orders, whose difference would be fp32 noise of |dP| in dS, dq, dk.
              // (The scores are recomputed bit for bit, so P is exactly 1 there, see fwd_direct.)
              const R lv = V::set1(l), dv = V::set1(dlt[row]), one = V::set1(Acc(1));
              if (!a.dropout) {
                for (int64_t j = 0; j < n; j += W) {
                  const R p =
                      vexp<V>(V::sub(load_pad(s + j, n - j < W ? int(n - j) : W, ninf()), lv));
                  V::store(s + j, p);
                  const R ds = V::mul(p, V::sub(V::load(dp + j), dv));
                  V::store(dp + j, V::where(V::eq(p, one), V::zero(), ds));
                }
              } else {
                for (int64_t j = 0; j < n; j += W)
                  V::store(s + j, vexp<V>(V::sub(
                                      load_pad(s + j, n - j < W ? int(n - j) : W, ninf()), lv)));
                const uint32_t rh = drop_row(a, b, h, i);
                const Acc di = dlt[row];
                for (int64_t j = 0; j < n; ++j) {
                  const bool kp_ = keep(a, rh, kb + j);
                  const Acc p = s[j];
                  const Acc dpj = kp_ ? dp[j] * dsc : Acc(0);
                  dp[j] = p == Acc(1) ? Acc(0) : p * (dpj - di);
                  s[j] = kp_ ? p * dsc : Acc(0);
                }
              }
            }
            if (a.dmask != nullptr) {
              float* dm = a.dmask + row * a.Sk + kb;
              for (int64_t j = 0; j < n; ++j) dm[j] = float(dp[j]);
            }
            if (a.softcap > 0) {  // d(c tanh(x / c)) / dx = 1 - tanh^2
              const Acc* th = Th + r * NK;
              for (int64_t j = 0; j < n; ++j) dp[j] *= Acc(1) - th[j] * th[j];
            }
          }
          if constexpr (dot) {
            for (int64_t r = 0; r < mq; ++r)
              for (int64_t j = 0; j < n; j += 32) {
                const int c = n - j < 32 ? int(n - j) : 32;
                V::to_bf16x32(reinterpret_cast<uint16_t*>(P16 + r * (NK / 2)) + j, S + r * NK + j,
                              c);
                V::to_bf16x32(reinterpret_cast<uint16_t*>(dS16 + r * (NK / 2)) + j, dP + r * NK + j,
                              c);
              }
            pair_rows(PT, NK, reinterpret_cast<const uint16_t*>(P16), NK, mq, n);
            pair_rows(dST, NK, reinterpret_cast<const uint16_t*>(dS16), NK, mq, n);
            pair_rows(Qi, Dp, reinterpret_cast<const uint16_t*>(Qb), 2 * D2, mq, D);
            pair_rows(dOi, Dvp, reinterpret_cast<const uint16_t*>(dOb), 2 * Dv2, mq, Dv);
            gemm(n, Dv, mq2, PT, 1, NK, dOi, Dvp, dV, Dvp, true);
            gemm(n, D, mq2, dST, 1, NK, Qi, Dp, dK, Dp, true);
            gemm(mq, D, (n + 1) / 2, dS16, NK / 2, 1, Kj, Dp,
                 dq_acc + ((b * a.H + h) * a.Sq + ib) * D, D, true);
          } else {
            // dV += Pd^T dO, dK += dS^T (scale Q), dq_acc += dS K.
            gemm(n, Dv, mq, S, 1, NK, dOs, Dvp, dV, Dvp, true);
            gemm(n, D, mq, dP, 1, NK, Qs, Dp, dK, Dp, true);
            gemm(mq, D, n, dP, NK, 1, kp + kb * a.k_str[2], a.k_str[2],
                 dq_acc + ((b * a.H + h) * a.Sq + ib) * D, D, true);
          }
        }
      }
      T* dkp = static_cast<T*>(a.dk) + ((b * a.Hkv + hkv) * a.Sk + kb) * D;
      T* dvp = static_cast<T*>(a.dv) + ((b * a.Hkv + hkv) * a.Sk + kb) * Dv;
      const R ks = V::set1(dot ? Acc(a.scale) : Acc(1));  // dot: dS^T Q was unscaled
      for (int64_t j = 0; j < n; ++j) {
        int64_t d = 0;
        for (; d + W <= D; d += W) V::store(dkp + j * D + d, V::mul(V::load(dK + j * Dp + d), ks));
        if (d < D) V::storen(dkp + j * D + d, V::mul(V::load(dK + j * Dp + d), ks), int(D - d));
        for (d = 0; d + W <= Dv; d += W) V::store(dvp + j * Dv + d, V::load(dV + j * Dvp + d));
        if (d < Dv) V::storen(dvp + j * Dv + d, V::load(dV + j * Dvp + d), int(Dv - d));
      }
    }
  }

  template <class T>
  static void dq(const AttnArgs& a, const void* acc_v, int64_t nchunks, int64_t cstride, int64_t r0,
                 int64_t r1) {
    const int64_t D = a.D;
    const Acc* acc = static_cast<const Acc*>(acc_v);
    const R sc = V::set1(Acc(a.scale));
    for (int64_t r = r0; r < r1; ++r) {
      T* out = static_cast<T*>(a.dq) + r * D;
      for (int64_t d = 0; d < D; d += W) {
        const int c = D - d < W ? int(D - d) : W;
        R s = V::loadn(acc + r * D + d, c);
        for (int64_t k = 1; k < nchunks; ++k)
          s = V::add(s, V::loadn(acc + k * cstride + r * D + d, c));
        s = V::mul(s, sc);
        if (c == W)
          V::store(out + d, s);
        else
          V::storen(out + d, s, c);
      }
    }
  }

  template <class T, class TM>
  static AttnKernels make() {
    // Query rows per forward item, measured per tier: 64 with AVX-512's 32 registers and larger
    // caches (Zen 5); 24 with AVX2 (Zen 3), whose 32 KiB L1 then holds the Q, S and O tiles
    // (6, 12, 6 KiB) beside the K^T / V panels a micro-kernel streams (64 rows: 1.35x slower).
    constexpr int64_t rows = kRegs >= 32 ? 64 : 24;
    return AttnKernels{&fwd<T, TM>, &merge<T>, &pack_kv<T>, &delta<T>, &bwd<T, TM>, &dq<T>, rows};
  }
  // The table for data type T (DType x) and the mask's dtype.
  template <class T>
  static AttnKernels table(DType x, bool has_mask, DType mask) {
    if (!has_mask) return make<T, NoMask>();
    if (mask == DType::kBool) return make<T, uint8_t>();
    if (mask == DType::kFloat32) return make<T, float>();
    if (mask == x) return make<T, T>();
    return AttnKernels{};
  }
};
