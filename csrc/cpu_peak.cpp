// The CPU's fp32 FMA peak on the vector path in use, measured: a register-only loop of independent
// FMA chains per thread (no memory traffic), the limit the benchmark CLI reports a compute-bound
// kernel's GFLOP/s against (a large torch.mm reaches less: it also loads and stores). One loop per
// ISA, each in its target region; the scalar path has no vector FMA to measure.
#include <immintrin.h>
#include <omp.h>

#include <chrono>

#include "cpu/common.h"
#include "cpu_isa.h"

namespace fastattn::cpu {
namespace {

// Independent accumulators per thread: at least FMA latency x FMA ports (4 x 2 on Zen 3/4/5 and
// recent Intel cores) so the ports never wait on a result.
constexpr int kChains = 12;
constexpr long kSteps = 1 << 24;  // loop iterations per round: ~30 ms of FMAs at 3 GHz (AVX2)

}  // namespace

FASTATTN_BEGIN_AVX512
namespace avx512 {
static float fma_rounds(long steps) {
  __m512 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(1e-3f * float(i));
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
  for (long s = 0; s < steps; ++s)
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  float t[16], out = 0.f;
  for (int i = 0; i < kChains; ++i) {
    _mm512_storeu_ps(t, a[i]);
    for (float v : t) out += v;
  }
  return out;  // used by the caller, so the loop is not dropped
}
}  // namespace avx512
FASTATTN_END_ISA

FASTATTN_BEGIN_AVX2
namespace avx2 {
static float fma_rounds(long steps) {
  __m256 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(1e-3f * float(i));
  const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
  for (long s = 0; s < steps; ++s)
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  float t[8], out = 0.f;
  for (int i = 0; i < kChains; ++i) {
    _mm256_storeu_ps(t, a[i]);
    for (float v : t) out += v;
  }
  return out;
}
}  // namespace avx2
FASTATTN_END_ISA

double fma_peak_gflops(int threads, int rounds) {
  const Isa path = isa();
  if (path == Isa::kScalar) return 0.0;
  const bool zmm = path >= Isa::kAvx512;  // the avx512bf16 tier runs the same FMA loop
  const int lanes = zmm ? 16 : 8;
  double best = 0.0;
  volatile float sink = 0.f;
  for (int r = 0; r < rounds + 1; ++r) {  // round 0 warms the cores up (clocks, caches)
    const auto t0 = std::chrono::steady_clock::now();
    float sum = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
    sum += zmm ? avx512::fma_rounds(kSteps) : avx2::fma_rounds(kSteps);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + sum;
    const double gflops = 2.0 * lanes * kChains * double(kSteps) * threads / s / 1e9;
    if (r > 0 && gflops > best) best = gflops;
  }
  (void)sink;
  return best;
}

}  // namespace fastattn::cpu
