// Generic row helpers over the Vec interface (vec_avx512.h): small integer helpers and the
// store loops (aligned non-temporal stores, prefetching while writing, fills).
// NO include guard and no namespace on purpose: included by softmax_impl.h (and any other
// kernel body) inside an ISA namespace and target region, like vec_math_impl.h.

template <class A, class B>
constexpr bool kSame = false;
template <class A>
constexpr bool kSame<A, A> = true;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Writes f(j, n) to y[j, j + n) over [c0, c1); n is W except at the ends, where f must not read
// past n lanes. With kNT the aligned middle uses non-temporal stores: for outputs far larger than
// the caches this skips the read-for-ownership of each output line (a third of the traffic).
template <class V, bool kNT, class T, class F>
inline void store_range(T* y, int64_t c0, int64_t c1, const F& f) {
  constexpr int W = V::W;
  int64_t j = c0;
  if constexpr (kNT) {
    const auto mis = int64_t(reinterpret_cast<uintptr_t>(y + j) % (W * sizeof(T)) / sizeof(T));
    if (mis != 0 && j < c1) {
      const int n = int(min64(W - mis, c1 - j));
      V::storen(y + j, f(j, n), n);
      j += n;
    }
    for (; j + W <= c1; j += W) V::stream(y + j, f(j, W));
  } else {
    for (; j + W <= c1; j += W) V::store(y + j, f(j, W));
  }
  if (j < c1) V::storen(y + j, f(j, int(c1 - j)), int(c1 - j));
}
template <class V, class T, class F>
inline void store_range(bool nt, T* y, int64_t c0, int64_t c1, const F& f) {
  if (nt)
    store_range<V, true>(y, c0, c1, f);
  else
    store_range<V, false>(y, c0, c1, f);
}

// store_range in slices, prefetching [pf, pf + pf_bytes) (and the same span of pf2 when given)
// spread over the slices: a pass that is not bound by memory pulls in what comes next.
template <class V, class T, class F>
inline void write_chunk(bool nt, T* y, int64_t c0, int64_t c1, const char* pf, int64_t pf_bytes,
                        const F& f, const char* pf2 = nullptr) {
  constexpr int64_t kSlice = 256;
  const int64_t step = (pf_bytes / ((c1 - c0 + kSlice - 1) / kSlice) + 63) / 64 * 64;
  for (int64_t j = c0, off = 0; j < c1; j += kSlice, off += step) {
    for (int64_t q = off; q < off + step && q < pf_bytes; q += 64) {
      __builtin_prefetch(pf + q, 0, 3);
      if (pf2 != nullptr) __builtin_prefetch(pf2 + q, 0, 3);
    }
    store_range<V>(nt, y, j, min64(c1, j + kSlice), f);
  }
}

template <class V, class T>
inline void fill(bool nt, T* y, int64_t c0, int64_t c1, typename V::Acc value) {
  const typename V::R v = V::set1(value);
  store_range<V>(nt, y, c0, c1, [&](int64_t, int) { return v; });
}
