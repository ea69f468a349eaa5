// fastattn._C: a small pybind11 module reporting how the extension was built. The ops themselves
// are dispatcher ops (torch.ops.fastattn.*), registered by static initialisers when this .so loads.
#include <pybind11/pybind11.h>

#include <string>

#include "checks.h"
#include "cpu_isa.h"
#include "output_pool.h"

#ifndef FASTATTN_VERSION
#define FASTATTN_VERSION "unknown"
#endif
#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {
// The name of st as a torch attribute (torch.float32, ...), for the dtype lists of checks.h.
const char* torch_dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kDouble:
      return "float64";
    default:
      return "unknown";
  }
}

// "float32,bfloat16,..." of a dtype list.
template <size_t N>
std::string dtype_names(const at::ScalarType (&types)[N]) {
  std::string names;
  for (const at::ScalarType st : types) {
    if (!names.empty()) names += ",";
    names += torch_dtype_name(st);
  }
  return names;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn compiled extension (build facts; ops live in torch.ops.fastattn)";
  m.def("build_info", [] {
    py::dict d;
    d["version"] = FASTATTN_VERSION;
#ifdef FASTATTN_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = FASTATTN_CUDA_ARCHS;
    d["cpu_isas_compiled"] = fastattn::cpu::compiled_isas();
    d["cpu_isa"] = fastattn::cpu::isa_name(fastattn::cpu::isa());
    // torch's names of the data dtypes the CPU kernels take ("float32,bfloat16,float16,float64"),
    // and those of the CUDA attention kernels (reported by a CPU build too: a constant).
    d["cpu_dtypes"] = dtype_names(fastattn::kCpuDataTypes);
    d["cuda_attention_dtypes"] = dtype_names(fastattn::kCudaAttentionTypes);
    return d;
  });
  m.def("cpu_cache_info", [] {
    const fastattn::OutputPoolStats s = fastattn::output_pool_stats();
    py::dict d;
    d["limit_bytes"] = s.limit_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_blocks"] = s.cached_blocks;
    d["live_bytes"] = s.live_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
  m.def("empty_cpu_cache", [] { return fastattn::output_pool_release(); });
  m.def("fma_peak_gflops", &fastattn::cpu::fma_peak_gflops, py::arg("threads"),
        py::arg("rounds") = 3,
        "Measured fp32 FMA GFLOP/s of the CPU vector path in use (0 on the scalar path).");
}
