// Softmax forward/backward kernels, written once against the Vec interface (vec_avx512.h).
// NO include guard and no namespace on purpose: softmax_<isa>.cpp includes this file inside its
// ISA namespace and target region, after vec_<isa>.h, so every function here is compiled for that
// ISA only. Raw pointers, no std:: or torch templates (see common.h).
//
// Forward, per row (z = x*scale + mask, columns j > i masked when causal):
//   short rows (<= kShortRowMax visible columns): one read of x, in chunks of kBlock. A chunk's
//   z goes to the thread's scratch row and becomes exp(z - chunk max) there (online-softmax sum)
//   while the next chunk / next row is prefetched; then y = e * exp(chunk max - max) / sum (log:
//   z - max - log(sum)) is written from cache. For multi-chunk rows that write is deferred and
//   done in slices during the next row's exp passes (PendingRow), overlapping stores and math.
//   long rows: online statistics over blocks (running max, sum rescaled when the max grows),
//   then a second read of x that writes y. These two halves also serve a row split over threads.
// Special rows match fastattn/reference.py: a row with nothing visible gives 0 (log: -inf); a
// row containing NaN gives NaN except at its -inf (masked) entries, which stay 0 (log: -inf).

constexpr int64_t kBlock = 4096;  // columns per chunk: the chunk's z stays in L1
// Sums run in fp32 lanes over chunks of kSumVecs vectors (few adds per lane, so tiny rounding
// error), and the chunk totals are added in double: fp32-exact sums even for 1M-column rows.
constexpr int64_t kSumVecs = 16;

#include "row_impl.h"

enum RowMode { kNormal, kDead, kNan };

// Mask element offset (and causal row index) of consecutive rows, advanced like an odometer.
struct RowCursor {
  int64_t idx[kMaxMaskDims];
  int64_t moff, crow;
  void init(const SoftmaxFwdArgs& a, int64_t r) {
    crow = a.causal ? r % a.causal_rows : 0;
    moff = 0;
    for (int k = a.mask_ndim - 1; k >= 0; --k) {
      idx[k] = r % a.mask_sizes[k];
      r /= a.mask_sizes[k];
      moff += idx[k] * a.mask_strides[k];
    }
  }
  void next(const SoftmaxFwdArgs& a) {
    if (a.causal && ++crow == a.causal_rows) crow = 0;
    for (int k = a.mask_ndim - 1; k >= 0; --k) {
      moff += a.mask_strides[k];
      if (++idx[k] < a.mask_sizes[k]) return;
      moff -= a.mask_sizes[k] * a.mask_strides[k];
      idx[k] = 0;
    }
  }
};

// One row's inputs: x, its per-column mask (M != NoMask) or per-row additive constant, and the
// number of visible columns (causal rows see columns 0..i only).
template <class V, class T, class M>
struct Row {
  using Acc = typename V::Acc;
  const T* x;
  const M* m;
  Acc madd;
  int64_t len;

  Row(const SoftmaxFwdArgs& a, int64_t r, const RowCursor& cur) : madd(0) {
    x = static_cast<const T*>(a.x) + r * a.cols;
    m = nullptr;
    if constexpr (!kSame<M, NoMask>) {
      m = static_cast<const M*>(a.mask) + cur.moff;
    } else if (a.mask != nullptr) {
      const int64_t o = cur.moff;
      switch (a.mask_dtype) {
        case DType::kBool:
          madd = static_cast<const uint8_t*>(a.mask)[o] ? Acc(0) : -Acc(__builtin_inf());
          break;
        case DType::kFloat32:
          madd = Acc(static_cast<const float*>(a.mask)[o]);
          break;
        case DType::kFloat64:
          madd = Acc(static_cast<const double*>(a.mask)[o]);
          break;
        case DType::kBFloat16:
          madd = Acc(bf16_to_f32(static_cast<const bf16_t*>(a.mask)[o]));
          break;
        case DType::kFloat16:
          madd = Acc(f16_to_f32(static_cast<const f16_t*>(a.mask)[o]));
          break;
      }
    }
    len = a.causal ? min64(cur.crow + 1, a.cols) : a.cols;
  }
  // z for the W columns from j, or for n < W of them (other lanes -inf).
  typename V::R z(int64_t j, typename V::R vs) const {
    if constexpr (kSame<M, NoMask>)
      return V::fma(V::load(x + j), vs, V::set1(madd));
    else
      return V::fma(V::load(x + j), vs, V::load(m + j));
  }
  typename V::R zn(int64_t j, int n, typename V::R vs) const {
    typename V::R v;
    if constexpr (kSame<M, NoMask>)
      v = V::fma(V::loadn(x + j, n), vs, V::set1(madd));
    else
      v = V::fma(V::loadn(x + j, n), vs, V::loadn(m + j, n));
    return V::where(V::first(n), v, V::set1(-__builtin_inff()));
  }
};

// z over columns [c0, c1) into buf (padded with -inf to a multiple of W); returns the max.
template <class V, class Rw>
inline typename V::Acc compute_z(const Rw& row, int64_t c0, int64_t c1, typename V::R vs,
                                 typename V::Acc* buf) {
  using R = typename V::R;
  constexpr int W = V::W;
  R m0 = V::set1(-__builtin_inff()), m1 = m0;
  int64_t j = c0;
  for (; j + 2 * W <= c1; j += 2 * W) {
    const R z0 = row.z(j, vs), z1 = row.z(j + W, vs);
    V::store(buf + (j - c0), z0);
    V::store(buf + (j - c0) + W, z1);
    m0 = V::max(m0, z0);
    m1 = V::max(m1, z1);
  }
  for (; j < c1; j += W) {
    const R z0 = j + W <= c1 ? row.z(j, vs) : row.zn(j, int(c1 - j), vs);
    V::store(buf + (j - c0), z0);
    m0 = V::max(m0, z0);
  }
  return V::hmax(V::max(m0, m1));
}

template <class V>
inline bool any_nan(const typename V::Acc* buf, int64_t n) {  // n: multiple of W
  for (int64_t j = 0; j < n; j += V::W)
    if (V::any(V::isnan(V::load(buf + j)))) return true;
  return false;
}

// sum of exp(buf - mx) over n (a multiple of W) entries, optionally storing the exps in place.
// This loop is compute-bound, so it also prefetches [pf, pf + pf_bytes) (the next row's x) into
// L1, spread over its iterations: the next row's first pass then reads from cache while this
// row's arithmetic hides the memory latency.
// side() is called once per kSumVecs vectors: the previous row's output is written there, so its
// stores overlap this arithmetic instead of forming a memory-bound pass of their own.
template <class V, bool kStore, class Side>
inline double exp_sum(typename V::Acc* buf, int64_t n, typename V::Acc mx, const char* pf,
                      int64_t pf_bytes, const Side& side) {
  using R = typename V::R;
  constexpr int W = V::W;
  const R vm = V::set1(mx);
  const int64_t pf_step = (pf_bytes / (n / (2 * W) + 1) + 63) / 64 * 64;  // bytes per iteration
  int64_t pf_off = 0;
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumVecs * W) {
    const int64_t e = min64(n, b + kSumVecs * W);
    R s0 = V::zero(), s1 = V::zero();
    int64_t j = b;
    for (; j + 2 * W <= e; j += 2 * W, pf_off += pf_step) {
      for (int64_t q = pf_off; q < pf_off + pf_step && q < pf_bytes; q += 64)
        __builtin_prefetch(pf + q, 0, 3);
      const R e0 = vexp<V>(V::sub(V::load(buf + j), vm));
      const R e1 = vexp<V>(V::sub(V::load(buf + j + W), vm));
      if constexpr (kStore) V::store(buf + j, e0), V::store(buf + j + W, e1);
      s0 = V::add(s0, e0);
      s1 = V::add(s1, e1);
    }
    for (; j < e; j += W) {
      const R e0 = vexp<V>(V::sub(V::load(buf + j), vm));
      if constexpr (kStore) V::store(buf + j, e0);
      s0 = V::add(s0, e0);
    }
    total += double(V::hsum(V::add(s0, s1)));
    side();
  }
  return total;
}

// y over [c0, c1) of a dead or NaN row (z recomputed: this is the rare path).
template <class V, class T, class Rw>
void write_special(const Rw& row, int64_t c0, int64_t c1, RowMode mode, const SoftmaxFwdArgs& a,
                   T* y) {
  using R = typename V::R;
  const typename V::Acc masked = a.log ? -__builtin_inff() : 0.f;
  if (mode == kDead) return fill<V>(false, y, c0, c1, masked);
  const R vs = V::set1(typename V::Acc(a.scale)), ninf = V::set1(-__builtin_inff());
  const R vmasked = V::set1(masked), vnan = V::set1(__builtin_nanf(""));
  store_range<V, false>(y, c0, c1, [&](int64_t j, int n) {
    const R z = n == V::W ? row.z(j, vs) : row.zn(j, n, vs);
    return V::where(V::eq(z, ninf), vmasked, vnan);
  });
}

// Statistics of columns [c0, c1) (already clipped to the visible length), block by block.
template <class V, class Rw>
RowStats long_stats(const Rw& row, int64_t c0, int64_t c1, double scale, typename V::Acc* buf) {
  using Acc = typename V::Acc;
  const typename V::R vs = V::set1(Acc(scale));
  RowStats st{-__builtin_inf(), 0.0, false};
  for (int64_t b = c0; b < c1; b += kBlock) {
    const int64_t e = min64(c1, b + kBlock), np = (e - b + V::W - 1) / V::W * V::W;
    const Acc bm = compute_z<V>(row, b, e, vs, buf);
    if (bm == -__builtin_inff()) {  // nothing visible in this block (unless a NaN hides here)
      if (any_nan<V>(buf, np)) return RowStats{st.max, st.sum, true};
      continue;
    }
    if (bm != bm) return RowStats{st.max, st.sum, true};
    if (bm > st.max) st.sum *= __builtin_exp(st.max - bm), st.max = bm;
    const auto* pf = reinterpret_cast<const char*>(row.x + e);  // the next block, if any
    const double s = exp_sum<V, false>(buf, np, Acc(st.max), pf,
                                       min64(c1 - e, kBlock) * int64_t(sizeof(*row.x)), [] {});
    if (s != s) return RowStats{st.max, st.sum, true};
    st.sum += s;
  }
  return st;
}

inline RowMode mode_of(const RowStats& st) {
  return st.nan ? kNan : st.max == -__builtin_inf() ? kDead : kNormal;
}

// Output of columns [c0, c1) of a normal row from the final statistics, recomputing z.
template <class V, class T, class Rw>
void long_write(const Rw& row, int64_t c0, int64_t c1, const RowStats& st, const SoftmaxFwdArgs& a,
                T* y) {
  using R = typename V::R;
  using Acc = typename V::Acc;
  const R vs = V::set1(Acc(a.scale)), vm = V::set1(Acc(st.max));
  const R inv = V::set1(Acc(1.0 / st.sum)), lse = V::set1(Acc(__builtin_log(st.sum)));
  if (a.log) {
    store_range<V>(a.stream, y, c0, c1, [&](int64_t j, int n) {
      return V::sub(V::sub(n == V::W ? row.z(j, vs) : row.zn(j, n, vs), vm), lse);
    });
  } else {
    store_range<V>(a.stream, y, c0, c1, [&](int64_t j, int n) {
      return V::mul(vexp<V>(V::sub(n == V::W ? row.z(j, vs) : row.zn(j, n, vs), vm)), inv);
    });
  }
}

// The output of a finished short row, written a slice at a time while the next row computes:
// y = e * f[chunk] from exp(z - chunk max), or (log) y = (z - max) - log(sum).
template <class V, class T>
struct PendingRow {
  using Acc = typename V::Acc;
  T* y = nullptr;  // null: nothing pending
  const Acc* src;
  int64_t n, j;  // length, next column to write
  bool log, nt;
  Acc vm, lse;
  Acc f[kShortRowMax / kBlock];

  void write(int64_t upto) {  // columns [j, upto)
    using R = typename V::R;
    upto = min64(upto, n);
    while (j < upto) {
      const int64_t e = min64(upto, (j / kBlock + 1) * kBlock);
      const R a = V::set1(log ? vm : f[j / kBlock]), b = V::set1(lse);
      if (log)
        store_range<V>(nt, y, j, e,
                       [&](int64_t i, int) { return V::sub(V::sub(V::load(src + i), a), b); });
      else if (f[j / kBlock] == Acc(0))  // nothing visible (src holds -inf there) or underflow
        store_range<V>(nt, y, j, e, [&](int64_t, int) { return V::zero(); });
      else
        store_range<V>(nt, y, j, e, [&](int64_t i, int) { return V::mul(V::load(src + i), a); });
      j = e;
    }
  }
  void finish() {
    if (y != nullptr) write(n);
    y = nullptr;
  }
};

// A short row (len <= kShortRowMax): one read of x, in chunks of kBlock columns. Each chunk's z
// goes to buf (at the chunk's offset) and is turned into exp(z - chunk max) in place while the
// next chunk (or the next row) is prefetched and the previous row's output is written; the
// running sum is rescaled when the max grows, as in online softmax. This row's output becomes
// `pend` (y = e * exp(chunk max - max) / sum), written during the next row or by finish().
template <class V, class T, class Rw>
void short_row(const Rw& row, const SoftmaxFwdArgs& a, T* y, typename V::Acc* buf,
               const char* next_x, int64_t next_bytes, PendingRow<V, T>& pend) {
  using Acc = typename V::Acc;
  constexpr Acc kNinf = -__builtin_inff();
  constexpr int W = V::W;
  const int64_t n = row.len;
  const typename V::R vs = V::set1(Acc(a.scale));
  Acc cmax[kShortRowMax / kBlock];  // per-chunk max, -inf where nothing is visible
  double m = -__builtin_inf(), s = 0;
  RowMode mode = kNormal;
  // Columns of the pending row to write per side() call (every kSumVecs vectors of this row).
  const int64_t left = pend.y != nullptr ? pend.n - pend.j : 0;
  const int64_t per_call = (left / (n / (kSumVecs * W) + 1) + W) / W * W;
  auto side = [&] {
    if (pend.y != nullptr && pend.j < pend.n) pend.write(pend.j + per_call);
  };
  for (int64_t c = 0; c < n && mode == kNormal; c += kBlock) {
    const int64_t e = min64(n, c + kBlock), np = (e - c + W - 1) / W * W;
    Acc* b = buf + c;
    const Acc bm = cmax[c / kBlock] = compute_z<V>(row, c, e, vs, b);
    if (bm == kNinf) {  // nothing visible here, unless a NaN hides behind the max
      if (any_nan<V>(b, np)) mode = kNan;
      continue;
    }
    if (bm != bm) mode = kNan;
    const char* pf = e < n ? reinterpret_cast<const char*>(row.x + e) : next_x;
    const int64_t pf_bytes = min64(e < n ? (n - e) * int64_t(sizeof(T)) : next_bytes, kBlock * 4);
    const double cs = a.log ? exp_sum<V, false>(b, np, bm, pf, pf_bytes, side)
                            : exp_sum<V, true>(b, np, bm, pf, pf_bytes, side);
    // (libm calls only when there is something to rescale: short rows are often ~100 ns.)
    if (m == -__builtin_inf())
      s = cs, m = bm;
    else if (bm > m)
      s = s * __builtin_exp(m - bm) + cs, m = bm;
    else
      s += bm == m ? cs : cs * __builtin_exp(double(bm) - m);
    if (s != s) mode = kNan;  // a NaN (or +inf) entry
  }
  pend.finish();
  if (mode == kNormal && m == -__builtin_inf()) mode = kDead;
  if (mode != kNormal) return write_special<V>(row, 0, n, mode, a, y);
  pend.y = y;
  pend.src = buf;
  pend.n = n;
  pend.j = 0;
  pend.log = a.log;
  pend.nt = a.stream;
  pend.vm = Acc(m);
  pend.lse = a.log ? Acc(__builtin_log(s)) : Acc(0);
  for (int64_t c = 0; c < n; c += kBlock)  // 0 for chunks with nothing visible
    pend.f[c / kBlock] = cmax[c / kBlock] == kNinf ? Acc(0)
                         : cmax[c / kBlock] == m
                             ? Acc(1.0 / s)
                             : Acc(__builtin_exp(double(cmax[c / kBlock]) - m) / s);
  // A single-chunk row is written right away, from L1 (measured: deferring it only helps rows
  // whose write pass has to come from L2).
  if (n <= kBlock) pend.finish();
}

template <class V, class T, class M>
void fwd_rows(const SoftmaxFwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  using Acc = typename V::Acc;
  Acc* const bufs[2] = {static_cast<Acc*>(scratch), static_cast<Acc*>(scratch) + kShortRowMax + 64};
  const Acc masked = a.log ? -__builtin_inff() : 0.f;
  PendingRow<V, T> pend;
  RowCursor cur;
  cur.init(a, r0);
  for (int64_t r = r0; r < r1; ++r, cur.next(a)) {
    const Row<V, T, M> row(a, r, cur);
    T* y = static_cast<T*>(a.y) + r * a.cols;
    if (row.len <= kShortRowMax) {
      Acc* buf = pend.y != nullptr && pend.src == bufs[0] ? bufs[1] : bufs[0];
      const int64_t next = r + 1 < r1 ? a.cols * int64_t(sizeof(T)) : 0;  // prefetch next row
      short_row<V>(row, a, y, buf, reinterpret_cast<const char*>(row.x + a.cols), next, pend);
    } else {
      pend.finish();
      const RowStats st = long_stats<V>(row, 0, row.len, a.scale, bufs[0]);
      if (mode_of(st) == kNormal)
        long_write<V>(row, 0, row.len, st, a, y);
      else
        write_special<V>(row, 0, row.len, mode_of(st), a, y);
    }
    fill<V>(a.stream, y, row.len, a.cols, masked);  // causally masked tail
  }
  pend.finish();
  if (a.stream) V::fence();
}

template <class V, class T, class M>
RowStats fwd_stats(const SoftmaxFwdArgs& a, int64_t r, int64_t c0, int64_t c1, void* scratch) {
  RowCursor cur;
  cur.init(a, r);
  const Row<V, T, M> row(a, r, cur);
  return long_stats<V>(row, c0, max64(c0, min64(c1, row.len)), a.scale,
                       static_cast<typename V::Acc*>(scratch));
}

template <class V, class T, class M>
void fwd_write(const SoftmaxFwdArgs& a, int64_t r, int64_t c0, int64_t c1, const RowStats& st) {
  RowCursor cur;
  cur.init(a, r);
  const Row<V, T, M> row(a, r, cur);
  T* y = static_cast<T*>(a.y) + r * a.cols;
  const int64_t vis = max64(c0, min64(c1, row.len));
  if (mode_of(st) == kNormal)
    long_write<V>(row, c0, vis, st, a, y);
  else
    write_special<V>(row, c0, vis, mode_of(st), a, y);
  fill<V>(a.stream, y, vis, c1, a.log ? -__builtin_inff() : 0.f);
  if (a.stream) V::fence();
}

#include "softmax_bwd_impl.h"

template <class V, class T, class M>
SoftmaxKernels make_kernels() {
  return {&fwd_rows<V, T, M>, &fwd_stats<V, T, M>, &fwd_write<V, T, M>,
          &bwd_rows<V, T>,    &bwd_dot<V, T>,      &bwd_write<V, T>};
}

// The table for x of type T; null entries for a mask dtype the op does not accept with T.
template <class V, class T>
SoftmaxKernels kernels_for(DType mask, bool per_column, DType t_dtype) {
  if (!per_column) return make_kernels<V, T, NoMask>();
  if (mask == DType::kBool) return make_kernels<V, T, uint8_t>();
  if (mask == DType::kFloat32) return make_kernels<V, T, float>();
  if constexpr (!kSame<T, float>)
    if (mask == t_dtype) return make_kernels<V, T, T>();
  return SoftmaxKernels{};
}
