// A host-side execution layer for fastattn's CUDA C++ kernels (test tooling only, never part of
// the shipped library; see docs/cuda-host.md). The kernel headers (csrc/cuda/*_kernels.cuh and
// device.cuh) compile with g++ after this header, and `cuda_host::launch` runs a kernel on the CPU:
// blocks one after another, each thread of a block a cooperatively scheduled fiber (ucontext), so
// that __syncthreads is a real barrier of the block and the warp shuffles and votes run in
// lock-step per warp (all 32 lanes arrive, exchange, continue).
//
// Errors a GPU would turn into a hang or undefined behaviour are reported as cuda_host::Error
// from launch(): a barrier some threads of the block never reach (they exited, or wait at another
// barrier or collective), lanes of one warp at different collectives, a collective whose mask is
// not the whole warp, a shuffle from a lane outside the mask, dynamic shared memory over the
// launch's size (under AddressSanitizer).
//
// Opt-in (set_race_check, FASTATTN_CUDA_HOST_RACE=1): a shared-memory race check, two threads of
// a block touching a shared word between two barriers, one of them writing (cuda_host_race.h).
//
// Not modelled: timing, the memory model beyond barriers (a fiber runs until it blocks, so a
// missing __threadfence or, without the race check, a read of another thread's shared memory
// without a barrier may happen to work here), tensor cores, fast-math intrinsics' precision,
// partial-warp masks.
#pragma once

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_HOST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_HOST_ASAN 1
#endif
#endif
#ifdef CUDA_HOST_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#ifndef FASTATTN_CUDA_HOST
#define FASTATTN_CUDA_HOST 1
#endif

// ------------------------------------------------------------------------ qualifiers as no-ops
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static __shared__ arrays are function-local statics: one per kernel instantiation, shared by
// every fiber of the block (blocks run one at a time). Dynamic shared memory: dynamic_smem().
// The race check finds them in the module's symbol table (cuda_host_race.h).
#define __shared__ static

namespace cuda_host {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int kWarp = 32;

namespace detail {

enum class Wait { kNone, kBlock, kWarp, kDone };
enum class Op { kShflIdx, kShflXor, kShflDown, kShflUp, kBallot, kSyncwarp };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kShflIdx:
      return "__shfl_sync";
    case Op::kShflXor:
      return "__shfl_xor_sync";
    case Op::kShflDown:
      return "__shfl_down_sync";
    case Op::kShflUp:
      return "__shfl_up_sync";
    case Op::kBallot:
      return "__ballot_sync/__any_sync/__all_sync";
    case Op::kSyncwarp:
      return "__syncwarp";
  }
  return "?";
}

struct Fiber {
  ucontext_t ctx{};
  char* stack = nullptr;  // mmap'd, a PROT_NONE guard page below
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // ASan's fake stack of this fiber while switched out
  uint3 tid;
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::kNone;
  uint64_t barriers = 0;   // __syncthreads passed
  uint64_t wait_gen = 0;   // the block barrier generation waited for
  uint64_t warp_seq = 0;   // collectives entered
  uint32_t syncwarps = 0;  // __syncwarp calls passed (the race check's order within a warp)
};

// A warp's two exchange buffers: collective n uses buffer n % 2. A lane can only enter collective
// n + 2 once n + 1 completed, i.e. once every lane has left collective n and read its value.
struct WarpBuf {
  int arrived = 0;
  Op op{};
  unsigned mask = 0;
  int width = 0;
  uint64_t slot[kWarp] = {};
  bool pred[kWarp] = {};
};
struct Warp {
  WarpBuf buf[2];
  uint64_t completed = 0;  // collectives completed (seq numbers are 1-based)
  unsigned lanes = 0;      // the lanes that exist (a partial last warp has fewer)
};

struct Launch;
namespace race {
struct State;
}

// The layer's globals, on a page of their own: the race check's signal handlers read them, and
// no shared memory page (which the check protects) can hold them.
struct alignas(4096) Globals {
  Launch* active = nullptr;
  race::State* race = nullptr;  // the race check of the running launch
  int race_on = -1;             // -1: not yet read from FASTATTN_CUDA_HOST_RACE
  uint64_t race_recorded = 0;   // accesses the race check recorded (race_check_recorded)
};
__attribute__((visibility("hidden"))) inline Globals& globals() {
  static Globals g;
  return g;
}

struct Launch {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::function<void()> body;
  Fiber* current = nullptr;
  ucontext_t sched{};
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  int live = 0;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  std::string error;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  race::State* race = nullptr;
};

inline Launch*& active() { return globals().active; }

// Counts the blocks run, over all launches: per-block state kept outside the Launch
// (tensor_core.h's pending copies) knows a new block by it.
inline uint64_t& block_serial() {
  static uint64_t n = 0;
  return n;
}

inline Launch& launch_state() {
  Launch* l = active();
  if (l == nullptr) throw Error("cuda_host: a CUDA built-in used outside of a kernel launch");
  return *l;
}

inline Fiber& self() { return *launch_state().current; }

inline std::string where(const Launch& l, const Fiber& f) {
  return "block (" + std::to_string(l.block_idx.x) + "," + std::to_string(l.block_idx.y) + "," +
         std::to_string(l.block_idx.z) + ") thread (" + std::to_string(f.tid.x) + "," +
         std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + ")";
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield_to_scheduler(bool exiting = false) {
  Launch& l = launch_state();
  Fiber& f = *l.current;
#ifdef CUDA_HOST_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, l.sched_bottom, l.sched_size);
#endif
  swapcontext(&f.ctx, &l.sched);
#ifdef CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  (void)exiting;
}

// Records the first error and stops the block: the scheduler never resumes a fiber after it.
[[noreturn]] inline void fail(const std::string& what) {
  Launch& l = launch_state();
  if (l.error.empty()) l.error = what;
  yield_to_scheduler();
  std::abort();  // unreachable: the scheduler does not resume a failed launch
}

}  // namespace detail
}  // namespace cuda_host

#include "cuda_host_race.h"

namespace cuda_host {
namespace detail {

inline void fiber_entry() {
  Launch& l = launch_state();
#ifdef CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l.sched_bottom, &l.sched_size);
#endif
  l.body();
  Fiber& f = *l.current;
  f.wait = Wait::kDone;
  --l.live;
  if (l.block_arrived > 0)
    fail("cuda_host: divergent __syncthreads: " + where(l, f) + " exited after " +
         std::to_string(f.barriers) + " barriers while " + std::to_string(l.block_arrived) +
         " threads wait at barrier #" + std::to_string(l.block_gen + 1));
  const Warp& w = l.warps[f.warp];
  if (w.buf[0].arrived + w.buf[1].arrived > 0)
    fail("cuda_host: " + where(l, f) + " exited while lanes of its warp wait at a collective");
  yield_to_scheduler(/*exiting=*/true);
}

inline bool ready(const Launch& l, const Fiber& f) {
  switch (f.wait) {
    case Wait::kNone:
      return true;
    case Wait::kBlock:
      return l.block_gen >= f.wait_gen;
    case Wait::kWarp:
      return l.warps[f.warp].completed >= f.warp_seq;
    case Wait::kDone:
      return false;
  }
  return false;
}

inline std::string deadlock_report(const Launch& l) {
  std::string s = "cuda_host: deadlock in block (" + std::to_string(l.block_idx.x) + "," +
                  std::to_string(l.block_idx.y) + "," + std::to_string(l.block_idx.z) + "): ";
  int at_block = 0, at_warp = 0, done = 0;
  for (const Fiber& f : l.fibers) {
    at_block += f.wait == Wait::kBlock;
    at_warp += f.wait == Wait::kWarp;
    done += f.wait == Wait::kDone;
  }
  s += std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
       " at a warp collective, " + std::to_string(done) +
       " exited (a barrier or collective "
       "that not every thread reaches)";
  return s;
}

inline void run_block(Launch& l) {
  const int n = static_cast<int>(l.fibers.size());
  ++block_serial();
  for (Fiber& f : l.fibers) {
    f.wait = Wait::kNone;
    f.barriers = f.wait_gen = f.warp_seq = 0;
    f.syncwarps = 0;
    f.fake_stack = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = f.stack_size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (Warp& w : l.warps) {
    const unsigned lanes = w.lanes;
    w = Warp{};
    w.lanes = lanes;
  }
  l.live = n;
  l.block_arrived = 0;
  l.block_gen = 0;
  if (l.dyn_bytes > 0) std::memset(l.dyn, 0xff, l.dyn_bytes);  // garbage: NaN as float
  if (l.race != nullptr) race::block_begin(*l.race);  // the shared memory closed: accesses fault
  int done = 0;
  while (done < n) {
    bool progress = false;
    for (Fiber& f : l.fibers) {
      if (!ready(l, f)) continue;
      progress = true;
      f.wait = Wait::kNone;
      l.current = &f;
#ifdef CUDA_HOST_ASAN
      __sanitizer_start_switch_fiber(&l.sched_fake, f.stack, f.stack_size);
#endif
      swapcontext(&l.sched, &f.ctx);
#ifdef CUDA_HOST_ASAN
      __sanitizer_finish_switch_fiber(l.sched_fake, nullptr, nullptr);
#endif
      l.current = nullptr;
      if (l.race != nullptr && l.error.empty()) l.error = race::message(l, *l.race);
      if (!l.error.empty()) return;
      done += f.wait == Wait::kDone;
    }
    if (!progress) {
      l.error = deadlock_report(l);
      return;
    }
  }
  const uint64_t b0 = l.fibers[0].barriers;
  for (const Fiber& f : l.fibers)
    if (f.barriers != b0) {
      l.error = "cuda_host: divergent __syncthreads: " + where(l, l.fibers[0]) + " passed " +
                std::to_string(b0) + " barriers, " + where(l, f) + " " + std::to_string(f.barriers);
      return;
    }
}

// Lock-step warp collective: deposits this lane's value, waits for every lane of the warp, returns
// the deposit buffer (valid until this lane's next collective).
inline const WarpBuf& warp_collective(Op op, unsigned mask, uint64_t value, bool pred, int width) {
  Launch& l = launch_state();
  Fiber& f = *l.current;
  Warp& w = l.warps[f.warp];
  if (mask != w.lanes)
    fail("cuda_host: " + std::string(op_name(op)) + " with mask " + std::to_string(mask) + " at " +
         where(l, f) + ": only whole-warp masks are modelled (the warp's lanes: " +
         std::to_string(w.lanes) + ")");
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0)
    fail("cuda_host: " + std::string(op_name(op)) + " width " + std::to_string(width) +
         " is not a power of two <= 32 at " + where(l, f));
  const uint64_t seq = ++f.warp_seq;
  WarpBuf& b = w.buf[seq & 1];
  if (b.arrived == 0) {
    b.op = op;
    b.mask = mask;
    b.width = width;
  } else if (b.op != op || b.width != width) {
    fail("cuda_host: lanes of a warp at different collectives: " + where(l, f) + " at " +
         op_name(op) + " (width " + std::to_string(width) + "), others at " + op_name(b.op) +
         " (width " + std::to_string(b.width) + ")");
  }
  b.slot[f.lane] = value;
  b.pred[f.lane] = pred;
  if (++b.arrived == __builtin_popcount(mask)) {
    b.arrived = 0;
    w.completed = seq;
  } else {
    f.wait = Wait::kWarp;
    yield_to_scheduler();
  }
  return b;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
T shuffle(Op op, unsigned mask, T v, int arg, int width) {
  const WarpBuf& b = warp_collective(op, mask, to_bits(v), false, width);
  Launch& l = launch_state();
  const Fiber& f = *l.current;
  const int lane = f.lane, lo = lane & ~(width - 1), hi = lo + width - 1;
  int src = lane;
  switch (op) {
    case Op::kShflIdx:
      src = lo + (arg & (width - 1));
      break;
    case Op::kShflXor:
      src = lane ^ arg;
      break;  // earlier groups readable, later ones not (CUDA)
    case Op::kShflDown:
      src = lane + arg;
      break;
    case Op::kShflUp:
      src = lane - arg < lo ? lane : lane - arg;
      break;
    default:
      break;
  }
  if (src > hi || src < 0) src = lane;
  if (((b.mask >> src) & 1u) == 0)
    fail("cuda_host: " + std::string(op_name(op)) + " at " + where(l, f) + " reads lane " +
         std::to_string(src) + ", outside the mask");
  return from_bits<T>(b.slot[src]);
}

}  // namespace detail

// ------------------------------------------------------------------------------ the built-ins

inline uint3 thread_idx() { return detail::self().tid; }
inline uint3 block_idx() { return detail::launch_state().block_idx; }
inline dim3 block_dim() { return detail::launch_state().block; }
inline dim3 grid_dim() { return detail::launch_state().grid; }

inline void syncthreads() {
  detail::Launch& l = detail::launch_state();
  detail::Fiber& f = *l.current;
  ++f.barriers;
  if (++l.block_arrived == l.live) {
    l.block_arrived = 0;
    ++l.block_gen;
  } else {
    f.wait = detail::Wait::kBlock;
    f.wait_gen = l.block_gen + 1;
    detail::yield_to_scheduler();
  }
}

// The launch's dynamic shared memory (extern __shared__), 16-byte aligned, filled with 0xff bytes
// at the start of each block; exactly dynamic_smem_bytes long (ASan reports an access past it).
inline void* dynamic_smem() { return detail::launch_state().dyn; }

// Runs kernel<<<grid, block, dynamic_smem_bytes>>>(args...) to completion on the calling thread.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535)
    throw Error("cuda_host: invalid launch configuration: grid (" + std::to_string(grid.x) + "," +
                std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block (" +
                std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                std::to_string(block.z) + ")");
  if (detail::active() != nullptr) throw Error("cuda_host: launch from inside a kernel");
  // Kernel arguments are copied, as by a real launch; each thread calls with its own copies.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  detail::Launch l;
  l.grid = grid;
  l.block = block;
  l.body = [&] { std::apply([&](auto... p) { kernel(p...); }, params); };
#ifdef CUDA_HOST_ASAN
  const size_t stack_size = size_t{256} << 10;
#else
  const size_t stack_size = size_t{64} << 10;
#endif
  const size_t page = 4096;
  l.fibers.resize(threads);
  l.warps.resize((threads + kWarp - 1) / kWarp);
  l.dyn_bytes = dynamic_smem_bytes;
  // With the race check: the dynamic shared memory in pages of the check's (page-aligned).
  std::unique_ptr<detail::race::Session> race;
  if (race_check()) {
    race = std::make_unique<detail::race::Session>(l, dynamic_smem_bytes);
  } else if (dynamic_smem_bytes > 0) {
    l.dyn = static_cast<unsigned char*>(::operator new(dynamic_smem_bytes, std::align_val_t{16}));
  }
  for (size_t i = 0; i < threads; ++i) {
    detail::Fiber& f = l.fibers[i];
    void* m = mmap(nullptr, stack_size + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw Error("cuda_host: mmap of a fiber stack failed");
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults
    f.stack = static_cast<char*>(m) + page;
    f.stack_size = stack_size;
    f.linear = static_cast<int>(i);
    f.tid = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
             static_cast<unsigned>(i / (uint64_t{block.x} * block.y))};
    f.warp = static_cast<int>(i / kWarp);
    f.lane = static_cast<int>(i % kWarp);
    l.warps[f.warp].lanes |= 1u << f.lane;
  }
  detail::active() = &l;
  for (unsigned z = 0; z < grid.z && l.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && l.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && l.error.empty(); ++x) {
        l.block_idx = {x, y, z};
        detail::run_block(l);
        if (l.race != nullptr) detail::race::block_end(*l.race);
      }
  detail::active() = nullptr;
  race.reset();
  for (detail::Fiber& f : l.fibers) {
#ifdef CUDA_HOST_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);  // an abandoned fiber's frames
#endif
    munmap(f.stack - page, f.stack_size + page);
  }
  if (l.dyn != nullptr) ::operator delete(l.dyn, std::align_val_t{16});
  if (!l.error.empty()) throw Error(l.error);
}

}  // namespace cuda_host

// ---------------------------------------------------------------- CUDA names, as the kernels use
using cuda_host::dim3;
using cuda_host::uint3;
#define threadIdx (::cuda_host::thread_idx())
#define blockIdx (::cuda_host::block_idx())
#define blockDim (::cuda_host::block_dim())
#define gridDim (::cuda_host::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads() { cuda_host::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_host::detail::warp_collective(cuda_host::detail::Op::kSyncwarp, mask, 0, false, 32);
  ++cuda_host::detail::self().syncwarps;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return cuda_host::detail::shuffle(cuda_host::detail::Op::kShflIdx, mask, v, src, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return cuda_host::detail::shuffle(cuda_host::detail::Op::kShflXor, mask, v, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_host::detail::shuffle(cuda_host::detail::Op::kShflDown, mask, v,
                                    static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_host::detail::shuffle(cuda_host::detail::Op::kShflUp, mask, v,
                                    static_cast<int>(delta), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const auto& b =
      cuda_host::detail::warp_collective(cuda_host::detail::Op::kBallot, mask, 0, pred != 0, 32);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if (((b.mask >> i) & 1u) && b.pred[i]) r |= 1u << i;
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// Atomics: the fibers of a launch run on one OS thread, one at a time, so plain updates are atomic.
// The race check does not see them (an atomic races with no access).
template <typename T>
T atomicAdd(T* p, T v) {
  const cuda_host::detail::SmemUnchecked open;
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const cuda_host::detail::SmemUnchecked open;
  const T old = *p;
  *p = std::max(old, v);
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const cuda_host::detail::SmemUnchecked open;
  const T old = *p;
  *p = std::min(old, v);
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const cuda_host::detail::SmemUnchecked open;
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const cuda_host::detail::SmemUnchecked open;
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// Vector types (the subset of CUDA's with their alignment).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Math built-ins without a <cmath> name (the plain ones, expf, fmaxf, rsqrtf's sqrt, are libm's).
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
using std::signbit;
