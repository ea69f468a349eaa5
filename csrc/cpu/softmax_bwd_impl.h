// Softmax backward kernels over the Vec interface. Included by softmax_impl.h inside the ISA
// namespace and target region (NO include guard, no namespace: see that file).
//
// dx = scale * dz with, per row,
//   softmax:     dz = y * (g - sum_j g_j y_j)
//   log-softmax: dz_i = 0 where y_i == -inf (masked), else g_i - exp(y_i) * sum_{y_j != -inf} g_j
// Two passes over g and y (a row reduction, then the write); the second pass hits cache for rows
// up to the L2 size. Reductions as in exp_sum: fp32 lanes per chunk, chunks added in double.

template <class V, class T>
double bwd_dot(const SoftmaxBwdArgs& a, int64_t r, int64_t c0, int64_t c1) {
  using R = typename V::R;
  constexpr int W = V::W;
  const T* g = static_cast<const T*>(a.grad) + r * a.cols;
  const T* y = static_cast<const T*>(a.y) + r * a.cols;
  const R ninf = V::set1(-__builtin_inff());
  // term(g, y): g*y, or (log) g where y != -inf. Tail lanes load as g = y = 0, adding 0.
  auto term = [&](R gv, R yv) {
    return a.log ? V::where(V::eq(yv, ninf), V::zero(), gv) : V::mul(gv, yv);
  };
  double total = 0;
  for (int64_t b = c0; b < c1; b += kSumVecs * W) {
    const int64_t e = min64(c1, b + kSumVecs * W);
    R s0 = V::zero(), s1 = V::zero();
    int64_t j = b;
    for (; j + 2 * W <= e; j += 2 * W) {
      s0 = V::add(s0, term(V::load(g + j), V::load(y + j)));
      s1 = V::add(s1, term(V::load(g + j + W), V::load(y + j + W)));
    }
    for (; j < e; j += W) {
      const int n = int(min64(W, e - j));
      s0 = V::add(s0, term(V::loadn(g + j, n), V::loadn(y + j, n)));
    }
    total += double(V::hsum(V::add(s0, s1)));
  }
  return total;
}

// The write pass over [c0, c1); bwd_rows passes the next row's g and y to prefetch meanwhile.
template <class V, class T>
void bwd_write_pf(const SoftmaxBwdArgs& a, int64_t r, int64_t c0, int64_t c1, double dot,
                  int64_t pf_bytes) {
  using R = typename V::R;
  using Acc = typename V::Acc;
  const T* g = static_cast<const T*>(a.grad) + r * a.cols;
  const T* y = static_cast<const T*>(a.y) + r * a.cols;
  T* dx = static_cast<T*>(a.dx) + r * a.cols;
  const R vs = V::set1(Acc(a.scale)), vd = V::set1(Acc(dot)), ninf = V::set1(-__builtin_inff());
  auto grad = [&](R gv, R yv) {
    if (!a.log) return V::mul(V::mul(yv, V::sub(gv, vd)), vs);
    const R d = V::mul(V::sub(gv, V::mul(vexp<V>(yv), vd)), vs);
    return V::where(V::eq(yv, ninf), V::zero(), d);
  };
  const auto* next_g = reinterpret_cast<const char*>(g + a.cols);
  const auto* next_y = reinterpret_cast<const char*>(y + a.cols);
  write_chunk<V>(
      a.stream, dx, c0, c1, next_g, pf_bytes,
      [&](int64_t j, int n) {
        return n == V::W ? grad(V::load(g + j), V::load(y + j))
                         : grad(V::loadn(g + j, n), V::loadn(y + j, n));
      },
      next_y);
}

template <class V, class T>
void bwd_write(const SoftmaxBwdArgs& a, int64_t r, int64_t c0, int64_t c1, double dot) {
  bwd_write_pf<V, T>(a, r, c0, c1, dot, 0);
  if (a.stream) V::fence();
}

template <class V, class T>
void bwd_rows(const SoftmaxBwdArgs& a, int64_t r0, int64_t r1) {
  const int64_t pf_bytes = min64(a.cols * int64_t(sizeof(T)), kBlock * 4);
  for (int64_t r = r0; r < r1; ++r)
    bwd_write_pf<V, T>(a, r, 0, a.cols, bwd_dot<V, T>(a, r, 0, a.cols), r + 1 < r1 ? pf_bytes : 0);
  if (a.stream) V::fence();
}
