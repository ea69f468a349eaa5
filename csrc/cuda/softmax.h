// Host entry points of the CUDA softmax kernels (csrc/cuda/softmax.cu), called by the dispatcher
// registrations in csrc/cuda/softmax_host.cpp once the inputs are checked. Schemas and semantics:
// csrc/ops.cpp and fastattn/reference.py::softmax.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace fastattn::cuda {

// fastattn::softmax: y = softmax(x * scale + mask) (log: log_softmax) over the last dim, causal
// masking optional. Expects checked inputs on one CUDA device.
at::Tensor softmax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                        bool causal, bool log);

// fastattn::softmax_backward: the gradient wrt x given grad_out and the forward's output. Expects
// checked inputs on one CUDA device.
at::Tensor softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, double scale,
                                 bool log);

}  // namespace fastattn::cuda
