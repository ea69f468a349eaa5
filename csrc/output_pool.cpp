// A bounded cache of freed output blocks for the CPU ops.
//
// Why: torch's CPU allocator is glibc's malloc. glibc maps every block of 32 MiB or more afresh and
// unmaps it on free, and returns the top of its heap to the OS once more than a (dynamic)
// threshold is free there. So an op called in a loop (every training step, every layer) often
// writes its output into pages the kernel must fault in and zero first: at 2048x4096 fp32 that is
// 8192 faults and 32 MiB of zeroing per call, several times the cost of a LayerNorm itself, and
// whether it happens depends on the heap's history, so timings swing by 3-10x from run to run.
//
// What: outputs of at least kMinPooledBytes (and at most the limit) come from whole-page
// anonymous mappings. When their tensor dies, the block is kept (up to FASTATTN_CPU_CACHE_BYTES in
// all, default 256 MiB; 0 turns the cache off) and handed to the next output that fits (a block
// at most 1/8 larger than asked). Blocks are never split or merged. This is what the CUDA caching
// allocator does on GPUs; the memory it holds is reported by fastattn.cpu_cache_info() and given
// back by fastattn.empty_cpu_cache(). Every allocation and free is reported to torch's profiler
// (profile_memory=True sees these tensors as it sees torch's own).
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace fastattn {
namespace {

// Smaller blocks stay with torch's allocator: glibc keeps them in its heap and they rarely fault.
constexpr size_t kMinPooledBytes = size_t{1} << 20;
constexpr size_t kDefaultLimitBytes = size_t{256} << 20;
constexpr size_t kPage = 4096;
// Fresh blocks of at least this size are backed by 2 MiB pages where transparent huge pages are
// on "madvise" (a common default): 512x fewer faults for the first touch of a block.
constexpr size_t kHugeAdviseBytes = size_t{4} << 20;

size_t limit_from_env() {
  const char* e = std::getenv("FASTATTN_CPU_CACHE_BYTES");
  return e != nullptr && e[0] != '\0' ? static_cast<size_t>(std::strtoull(e, nullptr, 10))
                                      : kDefaultLimitBytes;
}

class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& get() {
    // Never destroyed: tensors may outlive static destruction at exit and still call release.
    static OutputPool* pool = [] {
      auto* p = new OutputPool();
      // A fork while another thread holds the lock (a DataLoader worker) must not leave the
      // child's lock held forever.
      pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); },
                     [] { get().mu_.unlock(); });
      return p;
    }();
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    // A block larger than the limit could never be kept: from a fresh mapping it would gain
    // nothing and its 2 MiB-page faults cost more than glibc's (a 4 GiB softmax: 2.3x slower).
    if (n < kMinPooledBytes || n > limit_) return c10::GetCPUAllocator()->allocate(n);
    const size_t len = (n + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    size_t cap = len;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(len);
      if (it != free_.end() && it->first <= len + len / 8) {
        cap = it->first;
        p = it->second;
        free_.erase(it);
        cached_ -= cap;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) p = map_fresh(len);
    size_t live, total;
    {
      std::lock_guard<std::mutex> g(mu_);
      live_[p] = cap;
      live_bytes_ += cap;
      live = live_bytes_;
      total = live_bytes_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(cap), live, total,
                                     c10::Device(c10::DeviceType::CPU));
    return {p, p, &OutputPool::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputPool::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputPoolStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(limit_),
            static_cast<int64_t>(cached_),
            static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(live_bytes_),
            hits_,
            misses_};
  }

  int64_t release_cached() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> g(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    int64_t bytes = 0;
    for (const auto& [cap, p] : blocks) {
      munmap(p, cap);
      bytes += static_cast<int64_t>(cap);
    }
    return bytes;
  }

 private:
  OutputPool() : limit_(limit_from_env()) {}

  static void* map_fresh(size_t len) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      // Cached blocks of other sizes may be what stands in the way: give them back, retry once.
      get().release_cached();
      p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != MAP_FAILED, "fastattn: could not allocate ", len,
                     " bytes for an output (", std::strerror(errno), ")");
#if defined(MADV_HUGEPAGE)
    if (len >= kHugeAdviseBytes) {  // the 2 MiB-aligned interior; the advice dies with the map
      constexpr uintptr_t kHuge = uintptr_t{2} << 20;
      const auto lo = reinterpret_cast<uintptr_t>(p);
      const uintptr_t first = (lo + kHuge - 1) & ~(kHuge - 1), last = (lo + len) & ~(kHuge - 1);
      if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
#endif
    return p;
  }

  static void deleter(void* p) { get().release(p); }

  void release(void* p) {
    size_t cap = 0;
    bool keep = false;
    size_t live, total;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "fastattn output pool: unknown block");
      cap = it->second;
      live_.erase(it);
      live_bytes_ -= cap;
      keep = cached_ + cap <= limit_;
      if (keep) {
        free_.emplace(cap, p);
        cached_ += cap;
      }
      live = live_bytes_;
      total = live_bytes_ + cached_;
    }
    if (!keep) munmap(p, cap);
    c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(cap), live, total,
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mu_;
  const size_t limit_;
  std::multimap<size_t, void*> free_;       // capacity -> block
  std::unordered_map<void*, size_t> live_;  // block -> capacity
  size_t cached_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu(), "new_output: CPU outputs only");
  at::Tensor t = at::detail::empty_generic(shape, &OutputPool::get(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           opts.dtype().toScalarType(), std::nullopt);
  const char* poison = std::getenv("FASTATTN_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

OutputPoolStats output_pool_stats() { return OutputPool::get().stats(); }

int64_t output_pool_release() { return OutputPool::get().release_cached(); }

}  // namespace fastattn
