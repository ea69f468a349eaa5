// Every fastattn dispatcher op is declared here, once. Kernels register per dispatch key in the
// op's own file (CPU: csrc/<op>.cpp, CUDA: csrc/cuda/<op>.cpp); fake (meta) kernels and autograd
// formulas are registered from Python (fastattn/ops/<op>.py).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // softmax(x * scale + mask) over the last dim; `causal` masks column j > row i of the last two
  // dims (top-left aligned). A fully masked row gives 0 (log: -inf). See fastattn/ops/softmax.py.
  m.def("softmax(Tensor x, Tensor? mask, float scale, bool causal, bool log) -> Tensor");
  // Gradient of the above from its output: scale * dz, with dz = y * (g - sum(g * y)) or, for
  // log, dz = g - exp(y) * sum(g) taken over the unmasked (y != -inf) entries only.
  m.def("softmax_backward(Tensor grad_out, Tensor out, float scale, bool log) -> Tensor");
}
