// Vector math written once over the Vec interface (see vec_avx512.h for the member list).
// NO include guard and no namespace on purpose: each vec_<isa>.h includes this file inside its
// own ISA namespace and target region, so every instantiation is compiled for that ISA only.

// exp(x) in fp32 to ~1.3 ulp: Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for e^r (a minimax fit, relative error 1.7e-8 with these fp32 coefficients; Horner,
// 6 fma) and a scaling by 2^n. NaN -> NaN, -inf -> 0, +inf -> inf.
// With V::kScalef (AVX-512 vscalefps) the scaling is one instruction that also rounds subnormal
// results and overflows to inf correctly. Otherwise 2^n is built in the exponent field, which
// covers n in [-126, 127]: results below FLT_MIN flush to 0 (softmax never needs subnormal
// probabilities) and the input is capped at ~88.37 (softmax only calls this with x <= 0).
template <class V>
inline typename V::R vexp(typename V::R x) {
  using R = typename V::R;
  if constexpr (V::kLibmExp) {
    return V::exp_libm(x);
  } else {
    const R lo = V::set1(V::kScalef ? -110.f : -87.33654475f);
    const R hi = V::set1(V::kScalef ? 89.f : 88.3762626647949f);
    // max(a, b) = a > b ? a : b and min(a, b) = a < b ? a : b return b when either is NaN, so
    // putting x second keeps a NaN flowing through to the result.
    const R xc = V::min(hi, V::max(lo, x));
    // n = round(x / ln2) by the 1.5 * 2^23 shifter: the fma rounds to an integer in the low
    // mantissa bits of t (|x / ln2| < 2^22), so n = t - shifter and, below, 2^n is built from
    // t's bits. Cheaper than a round instruction on the busy FMA pipes.
    const R shifter = V::set1(12582912.0f);
    const R t = V::fma(xc, V::set1(1.44269504088896341f), shifter);
    const R n = V::sub(t, shifter);
    R r = V::fma(n, V::set1(-0.693359375f), xc);  // ln2 split in a short hi part (exact n*hi)
    r = V::fma(n, V::set1(2.12194440e-4f), r);    // and the lo remainder
    R p = V::set1(1.38436514e-3f);
    p = V::fma(p, r, V::set1(8.37415643e-3f));
    p = V::fma(p, r, V::set1(4.16680016e-2f));
    p = V::fma(p, r, V::set1(1.66664317e-1f));
    p = V::fma(p, r, V::set1(4.99999940e-1f));
    p = V::fma(p, r, V::set1(1.0f));
    p = V::fma(p, r, V::set1(1.0f));
    if constexpr (V::kScalef) {
      return V::scalef(p, n);  // exp(-110) rounds to 0: -inf (clamped to -110) gives exactly 0
    } else {
      const R y = V::mul(p, V::pow2_shifted(t));
      return V::where(V::lt(x, lo), V::zero(), y);  // -inf and underflow -> 0 (NaN: false)
    }
  }
}

// tanh(x) in fp32 to ~3.5 ulp: x P(x^2) / Q(x^2) on |x| <= 9 (x clamped there: tanh(9) rounds to
// 1), P of degree 5 and Q of degree 3, fitted here by iterated weighted least squares to the
// relative error (6.6 x 2^-24 at most with these fp32 coefficients, Horner); the result clamped
// to [-1, 1] (the fit overshoots 1 by 4e-7). One division, no exp: half the work of an exp-based
// form. NaN -> NaN. float64 takes libm's tanh.
template <class V>
inline typename V::R vtanh(typename V::R x) {
  using R = typename V::R;
  if constexpr (V::kLibmExp) {
    return __builtin_tanh(x);
  } else {
    // min/max return their second operand when either is NaN: x second keeps NaN flowing.
    const R one = V::set1(1.0f), mone = V::set1(-1.0f);
    const R xc = V::min(V::set1(9.0f), V::max(V::set1(-9.0f), x));
    const R u = V::mul(xc, xc);
    R p = V::set1(1.9242380258632785e-11f);
    p = V::fma(p, u, V::set1(-1.3182353875151875e-08f));
    p = V::fma(p, u, V::set1(9.406467142980546e-06f));
    p = V::fma(p, u, V::set1(0.0029364018701016903f));
    p = V::fma(p, u, V::set1(0.12933944165706635f));
    p = V::fma(p, u, one);
    R q = V::set1(0.0002302375214640051f);
    q = V::fma(q, u, V::set1(0.02382768504321575f));
    q = V::fma(q, u, V::set1(0.46267253160476685f));
    q = V::fma(q, u, one);
    const R y = V::div(V::mul(xc, p), q);
    return V::min(one, V::max(mone, y));
  }
}
