// LayerNorm/RMSNorm row kernels, written once against the Vec interface (vec_avx512.h).
// NO include guard and no namespace on purpose: norm_<isa>.cpp includes this file inside its
// ISA's namespace (fastattn::cpu::<isa>::norm) and target region, after vec_<isa>.h, so every
// function here is compiled for that ISA only. Raw pointers, no std:: or torch templates.
//
// Memory traffic: each row is read from memory once. Forward pass 1 loads x (+ res), writes h
// and sums; the output pass (and the LayerNorm variance pass, where one is needed) re-read the row
// from L1/L2 (h or x; an fp32 copy of h when h is streamed). While a row is written from cache, the
// next one is prefetched, so memory never idles between rows. Large outputs bypass the caches
// (non-temporal stores). The backward pass reads dy and h twice the same way.

// Row sums are taken in blocks of kNormBlock elements in fp32 lanes, and the blocks are added in
// double, so that long rows (hundreds of thousands of elements) keep full fp32 accuracy.
constexpr int64_t kNormBlock = 4096;

// The per-vector lambdas below must be inlined into their loops (g++ otherwise keeps some as
// calls when a helper has several call sites, and the kernels run 3x slower).
#ifndef FASTATTN_NORM_INLINE
#define FASTATTN_NORM_INLINE __attribute__((always_inline))
#endif
// Rows up to this size are prefetched one row ahead (see fwd_rows / bwd_rows).
constexpr int64_t kPrefetchRowBytes = 64 << 10;

inline int64_t nmin(int64_t a, int64_t b) { return a < b ? a : b; }

// K row sums at once: term(j, k, acc) adds the k (= W, or fewer in the tail) elements from j
// into acc[0..K); tail lanes >= k must add 0. Four accumulator sets hide the add/fma latency.
template <class V, int K, class F>
inline FASTATTN_NORM_INLINE void row_sums(int64_t n, F&& term, double* out) {
  using R = typename V::R;
  constexpr int W = V::W;
  for (int i = 0; i < K; ++i) out[i] = 0;
  for (int64_t b = 0; b < n; b += kNormBlock) {
    const int64_t e = nmin(n, b + kNormBlock);
    R a0[K], a1[K], a2[K], a3[K];
    for (int i = 0; i < K; ++i) a0[i] = a1[i] = a2[i] = a3[i] = V::zero();
    int64_t j = b;
    for (; j + 4 * W <= e; j += 4 * W) {
      term(j, W, a0);
      term(j + W, W, a1);
      term(j + 2 * W, W, a2);
      term(j + 3 * W, W, a3);
    }
    for (; j < e; j += W) term(j, int(nmin(W, e - j)), a0);
    for (int i = 0; i < K; ++i)
      out[i] += double(V::hsum(V::add(V::add(a0[i], a1[i]), V::add(a2[i], a3[i]))));
  }
}

template <class V, class T>
inline FASTATTN_NORM_INLINE typename V::R load_k(const T* p, int k) {
  return k == V::W ? V::load(p) : V::loadn(p, k);  // k is a constant W in the unrolled body
}

template <class V, class T>
inline FASTATTN_NORM_INLINE void store_k(T* p, typename V::R v, int k) {
  if (k == V::W)
    V::store(p, v);
  else
    V::storen(p, v, k);
}

// v, hidden from the optimiser. g++ contracts a*b + c into an fma by default
// (-ffp-contract=fast); where a product must stay rounded exactly as elsewhere, this prevents it.
template <class R>
inline R opaque(R v) {
  asm("" : "+x"(v));
  return v;
}

// Large outputs are written with non-temporal stores (a.stream): they bypass the caches, which
// saves the read-for-ownership of every output line (a third of the memory traffic of x -> y)
// and leaves the caches to the inputs. V::stream needs whole vectors at addresses aligned to
// their size.
template <class V, class T>
inline bool stream_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (V::W * sizeof(T)) == 0;
}

// Pass 1 of a row, where h = x, or h = T(x + res) written to h_out. RMSNorm: s[0] = sum(h^2).
// LayerNorm: s[0] = sum(h - shift), s[1] = sum((h - shift)^2), shift = x[0] (+ res[0]), so that
// the variance can usually be had without a second pass (see fwd_rows).
// With buf (h streamed: it will not be in cache), the rounded h is also kept in buf as fp32 for
// the later passes; otherwise they re-read h_out.
// stream_round(p, v) (norm_<isa>.cpp) streams v as T and returns it rounded to T.
template <class V, class T, bool RMS, bool RES>
inline void first_pass(const T* x, const T* res, T* h, typename V::Acc* buf, int64_t n,
                       double shift, double* s) {
  using R = typename V::R;
  constexpr int W = V::W;
  const bool nt = buf != nullptr && stream_aligned<V>(h);
  const R vk = V::set1(typename V::Acc(shift));
  row_sums<V, RMS ? 1 : 2>(
      n,
      [&](int64_t j, int k, R* acc) FASTATTN_NORM_INLINE {
        R v = load_k<V>(x + j, k);
        if constexpr (RES) {
          v = V::add(v, load_k<V>(res + j, k));
          if (nt && k == W) {
            v = stream_round(h + j, v);
          } else {
            store_k<V>(h + j, v, k);
            if constexpr (sizeof(T) != sizeof(typename V::Acc))
              v = load_k<V>(h + j, k);  // bf16/fp16: the rounded value (store-forwarded)
          }
          if (buf != nullptr) store_k<V>(buf + j, v, k);
        }
        if constexpr (RMS) {
          acc[0] = V::fma(v, v, acc[0]);
        } else {
          R d = V::sub(v, vk);
          if (k < W) d = V::where(V::first(k), d, V::zero());  // tail lanes add 0
          acc[0] = V::add(acc[0], d);
          acc[1] = V::fma(d, d, acc[1]);
        }
      },
      s);
}

// Pass 2 (LayerNorm): sum((h - mean)^2), h read from src (T, or the fp32 copy).
template <class V, class S>
inline double centred_squares(const S* src, int64_t n, double mean) {
  using R = typename V::R;
  const R vm = V::set1(typename V::Acc(mean));
  double ss;
  row_sums<V, 1>(
      n,
      [&](int64_t j, int k, R* acc) FASTATTN_NORM_INLINE {
        R d = V::sub(load_k<V>(src + j, k), vm);
        if (k < V::W) d = V::where(V::first(k), d, V::zero());
        acc[0] = V::fma(d, d, acc[0]);
      },
      &ss);
  return ss;
}

// Calls out(j, k) once for each piece [j, j + k) of [0, n), in order, and stores its result at
// y + j; with nt, non-temporal stores after plain ones up to the first aligned vector.
template <class V, class T, class F>
inline FASTATTN_NORM_INLINE void emit_row(T* y, int64_t n, bool nt, F&& out) {
  constexpr int W = V::W;
  int64_t j = 0;
  if (nt) {
    constexpr int64_t kAlign = W * int64_t(sizeof(T));
    const int64_t off = int64_t(reinterpret_cast<uintptr_t>(y) % kAlign) / int64_t(sizeof(T));
    const int64_t head = nmin(n, off == 0 ? 0 : (kAlign / int64_t(sizeof(T))) - off);
    if (head > 0) V::storen(y, out(0, int(head)), int(head));
    for (j = head; j + W <= n; j += W) V::stream(y + j, out(j, W));
  }
  for (; j + W <= n; j += W) V::store(y + j, out(j, W));
  if (j < n) V::storen(y + j, out(j, int(n - j)), int(n - j));
}

// Pass 3: y = (h - mean) * rstd (* w (+ b)), h read from src.
// next0/next1 (nullable): the next row's inputs, prefetched while this row is written (see
// fwd_rows).
template <class V, class T, class S, bool RMS, int AFFINE>
inline void write_row(const NormFwdArgs& a, const S* src, T* y, typename V::Acc mean,
                      typename V::Acc rstd, const T* next0, const T* next1) {
  using R = typename V::R;
  using Acc = typename V::Acc;
  const int64_t n = a.n;
  const Acc* w = static_cast<const Acc*>(a.w);
  const Acc* bias = static_cast<const Acc*>(a.b);
  const R vm = V::set1(mean), vr = V::set1(rstd);
  auto out = [&](int64_t j, int k) FASTATTN_NORM_INLINE {
    if (next0 != nullptr) __builtin_prefetch(next0 + j);
    if (next1 != nullptr) __builtin_prefetch(next1 + j);
    const R v = load_k<V>(src + j, k);
    R o = RMS ? V::mul(v, vr) : V::mul(V::sub(v, vm), vr);
    if constexpr (AFFINE == 1) o = V::mul(o, load_k<V>(w + j, k));
    if constexpr (AFFINE == 2) o = V::fma(o, load_k<V>(w + j, k), load_k<V>(bias + j, k));
    return o;
  };
  emit_row<V>(y, n, a.stream, out);
}

// Whole rows [r0, r1) of the forward pass. scratch: n math-type values (used when h is streamed).
template <class V, class T, bool RMS, bool RES, int AFFINE>
void fwd_rows(const NormFwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  using Acc = typename V::Acc;
  const int64_t n = a.n;
  Acc* buf = RES && a.stream ? static_cast<Acc*>(scratch) : nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    const T* res = RES ? static_cast<const T*>(a.res) + r * n : nullptr;
    T* h = RES ? static_cast<T*>(a.h) + r * n : nullptr;
    T* y = static_cast<T*>(a.y) + r * n;
    double s[2];
    double shift = 0;  // x[0] (+ res[0]), exactly (the other lanes load as 0)
    if constexpr (!RMS) {
      shift = double(V::hsum(load_k<V>(x, 1)));
      if constexpr (RES) shift += double(V::hsum(load_k<V>(res, 1)));
    }
    first_pass<V, T, RMS, RES>(x, res, h, buf, n, shift, s);
    double mean = 0, var = s[0] / double(n);
    if constexpr (!RMS) {
      // var = E[(h - shift)^2] - E[h - shift]^2 in one pass, unless the subtraction cancels
      // (the mean is more than ~4 standard deviations from the shift): its rounding error is
      // then above a few fp32 ulps of var, so the exact second pass runs instead.
      const double m1 = s[0] / double(n), m2 = s[1] / double(n);
      mean = shift + m1;
      var = m2 - m1 * m1;
      if (!(var > m2 * (1.0 / 16))) {
        var = (buf != nullptr ? centred_squares<V>(buf, n, mean)
                              : centred_squares<V>(RES ? h : x, n, mean)) /
              double(n);
      }
    }
    const Acc rstd = Acc(1.0 / __builtin_sqrt(var + a.eps));
    if constexpr (!RMS) static_cast<Acc*>(a.mean)[r] = Acc(mean);  // saved in the math type
    static_cast<Acc*>(a.rstd)[r] = rstd;
    // Rows are read from memory in pass 1 only; while this one is written from cache, fetch the
    // next one, so that memory stays busy (short rows; the prefetcher follows long ones itself).
    const bool pf = r + 1 < r1 && n * int64_t(sizeof(T)) <= kPrefetchRowBytes;
    const T* next0 = pf ? x + n : nullptr;
    const T* next1 = pf && RES ? res + n : nullptr;
    if (buf != nullptr)
      write_row<V, T, Acc, RMS, AFFINE>(a, buf, y, Acc(mean), rstd, next0, next1);
    else
      write_row<V, T, T, RMS, AFFINE>(a, RES ? h : x, y, Acc(mean), rstd, next0, next1);
  }
  if (a.stream) V::fence();  // the non-temporal stores are visible before the op returns
}

// The backward pass's normalised input: (h - mean) * rstd, or h * rstd (RMSNorm).
template <class V, bool RMS>
inline FASTATTN_NORM_INLINE typename V::R xhat(typename V::R h, typename V::R mean,
                                               typename V::R rstd) {
  return RMS ? V::mul(h, rstd) : V::mul(V::sub(h, mean), rstd);
}

// Rows whose dweight/dbias shares are added to the chunk's partial sums together (one read and
// write of the partials per group instead of per row: stores are the scarce resource).
constexpr int kBwdGroup = 4;

// Whole rows [r0, r1) of the backward pass; dw_part/db_part: this chunk's partial sums, which
// the first group writes and later groups add to.
template <class V, class T, bool RMS, bool DH, bool BIAS>
void bwd_rows(const NormBwdArgs& a, int64_t r0, int64_t r1, void* dw_part, void* db_part) {
  using R = typename V::R;
  using Acc = typename V::Acc;
  const int64_t n = a.n;
  const Acc* w = static_cast<const Acc*>(a.w);
  Acc* pw = static_cast<Acc*>(dw_part);
  Acc* pb = static_cast<Acc*>(db_part);
  const Acc* smean = static_cast<const Acc*>(a.mean);  // the forward's statistics, math type
  const Acc* srstd = static_cast<const Acc*>(a.rstd);
  for (int64_t r = r0; r < r1; r += kBwdGroup) {
    const int rows = int(nmin(kBwdGroup, r1 - r));
    R vm[kBwdGroup], vr[kBwdGroup];
    for (int i = 0; i < rows; ++i) {
      const T* dy = static_cast<const T*>(a.dy) + (r + i) * n;
      const T* h = static_cast<const T*>(a.h) + (r + i) * n;
      vm[i] = V::set1(RMS ? Acc(0) : smean[r + i]);
      vr[i] = V::set1(srstd[r + i]);
      const R m = vm[i], rs = vr[i];
      auto xhat_at = [&](int64_t j, int k)
                         FASTATTN_NORM_INLINE { return xhat<V, RMS>(load_k<V>(h + j, k), m, rs); };
      // Pass 1: c1 = mean(xhat * g), c2 = mean(g). Tail lanes: dy and w load as 0, so g = 0.
      double c[2];
      row_sums<V, 2>(
          n,
          [&](int64_t j, int k, R* acc) FASTATTN_NORM_INLINE {
            const R g = opaque(V::mul(load_k<V>(dy + j, k), load_k<V>(w + j, k)));
            acc[0] = V::fma(xhat_at(j, k), g, acc[0]);
            if (!RMS) acc[1] = V::add(acc[1], g);
          },
          c);
      const R neg_c1 = V::set1(Acc(-c[0] / double(n))), c2 = V::set1(Acc(c[1] / double(n)));

      // Pass 2: dx.
      T* dx = static_cast<T*>(a.dx) + (r + i) * n;
      const T* dh = DH ? static_cast<const T*>(a.dh) + (r + i) * n : nullptr;
      // The next row, while this one is in cache (short rows; the prefetcher follows long ones).
      const bool pf = r + i + 1 < r1 && n * int64_t(sizeof(T)) <= kPrefetchRowBytes;
      auto out = [&](int64_t j, int k) FASTATTN_NORM_INLINE {
        if (pf) __builtin_prefetch(dy + n + j), __builtin_prefetch(h + n + j);
        const R d = load_k<V>(dy + j, k), xh = xhat_at(j, k);
        // g as rounded in pass 1, so that g - c2 cancels exactly where it should (n = 1: dx = 0).
        const R g = opaque(V::mul(d, load_k<V>(w + j, k)));
        // (g - c2) - xhat * c1 rounded once: near-total cancellation is common (n = 1; RMSNorm
        // rows with h^2 >> eps), so every rounding saved shows in the result.
        R o = V::mul(V::fma(xh, neg_c1, RMS ? g : V::sub(g, c2)), rs);
        if constexpr (DH) o = V::add(o, load_k<V>(dh + j, k));
        return o;
      };
      emit_row<V>(dx, n, a.stream, out);
    }
    // This group's share of dw (sum of dy * xhat) and db (sum of dy), rows re-read from cache.
    const T* dy0 = static_cast<const T*>(a.dy) + r * n;
    const T* h0 = static_cast<const T*>(a.h) + r * n;
    const bool first = r == r0;
    constexpr int W = V::W;
    for (int64_t j = 0; j < n; j += W) {
      const int k = int(nmin(W, n - j));
      R sw = first ? V::zero() : load_k<V>(pw + j, k);
      R sb = first || !BIAS ? V::zero() : load_k<V>(pb + j, k);
      for (int i = 0; i < rows; ++i) {
        const R d = load_k<V>(dy0 + i * n + j, k);
        const R xh = xhat<V, RMS>(load_k<V>(h0 + i * n + j, k), vm[i], vr[i]);
        sw = V::fma(d, xh, sw);
        if constexpr (BIAS) sb = V::add(sb, d);
      }
      store_k<V>(pw + j, sw, k);
      if constexpr (BIAS) store_k<V>(pb + j, sb, k);
    }
  }
  if (a.stream) V::fence();
}

// The forward/backward pair for data of type T and the variant's compile-time flags.
template <class V, class T, bool RMS, bool RES>
NormFwdFn fwd_for(int affine) {
  return affine == 2   ? &fwd_rows<V, T, RMS, RES, 2>
         : affine == 1 ? &fwd_rows<V, T, RMS, RES, 1>
                       : &fwd_rows<V, T, RMS, RES, 0>;
}

template <class V, class T, bool RMS>
NormKernels kernels_for_rms(NormVariant v) {
  NormKernels k;
  k.fwd = v.res ? fwd_for<V, T, RMS, true>(v.affine) : fwd_for<V, T, RMS, false>(v.affine);
  if (v.dh)
    k.bwd = v.bias ? &bwd_rows<V, T, RMS, true, true> : &bwd_rows<V, T, RMS, true, false>;
  else
    k.bwd = v.bias ? &bwd_rows<V, T, RMS, false, true> : &bwd_rows<V, T, RMS, false, false>;
  return k;
}

template <class V, class T>
NormKernels kernels_for(NormVariant v) {
  return v.rms ? kernels_for_rms<V, T, true>(v) : kernels_for_rms<V, T, false>(v);
}
