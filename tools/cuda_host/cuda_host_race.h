// The host execution layer's shared-memory race check (included by cuda_host.h after its launch
// state; see docs/cuda-host.md, "Shared-memory race check"). Opt-in: cuda_host::set_race_check
// or FASTATTN_CUDA_HOST_RACE=1; x86-64 Linux only, not under AddressSanitizer (which owns
// SIGSEGV).
//
// How: while a block runs, every page holding its shared memory is PROT_NONE. An access faults;
// the SIGSEGV handler records it (address, the running fiber, read or write from the page-fault
// error code), opens the page for that access and sets the trap flag; after the one instruction,
// the SIGTRAP handler closes the page again. The shared memory: the launch's dynamic buffer (in
// pages of its own, one slack page after it: an access there is reported as past its size) and
// the static __shared__ arrays, i.e. the function-local statics of the layer's module (found in
// its ELF symbol table: g++ ignores a section attribute on a template's statics), except those of
// functions in cuda_host, std, c10, at and torch. Per 4-byte word and barrier interval the check
// keeps the last writer and two readers (the first and the latest other one); two threads of the
// block touching a word in one interval, one of them writing, is a race unless they are lanes of
// one warp with a __syncwarp between. An access is seen at the word of its first byte.
//
// For layer code that touches shared memory on behalf of a thread (tensor_core.h: ldmatrix reads
// rows for lanes, cp.async writes them at the wait): smem_access() records an access as a given
// thread; under SmemUnchecked the layer's own accesses neither fault nor count; smem_copy_as()
// does both for a copy.
#pragma once

#include <signal.h>

#include <cstdlib>
#include <memory>

#include "cuda_host_smem_symbols.h"

namespace cuda_host {

namespace detail {
namespace race {

#if defined(CUDA_HOST_ASAN)
inline const char* unavailable() { return "under AddressSanitizer (it owns SIGSEGV)"; }
#elif defined(__x86_64__) && defined(__linux__)
#define CUDA_HOST_RACE_CHECK 1
inline const char* unavailable() { return nullptr; }
#else
inline const char* unavailable() { return "it needs x86-64 Linux"; }
#endif

constexpr uintptr_t kPage = 4096;
inline uintptr_t page_down(uintptr_t a) { return a & ~(kPage - 1); }
inline uintptr_t page_up(uintptr_t a) { return (a + kPage - 1) & ~(kPage - 1); }

struct Access {
  int32_t tid = -1;    // linear thread of the block; -1: none
  uint32_t epoch = 0;  // the __syncwarp calls the thread had passed
};
struct Word {
  uint64_t interval = 0;  // State::base + block_gen of the accesses below; 0: none
  Access w, r0, r1;       // last writer; first reader and the latest other reader
};
struct Hit {
  bool any = false;
  uintptr_t addr = 0;
  Access first, second;
  bool first_write = false, second_write = false;
  uint64_t gen = 0;  // barrier interval: the block's __syncthreads completed before it
};

// What the signal handlers read and write: plain data, reached through globals().race.
struct State {
  Launch* l = nullptr;
  const Fiber* fibers = nullptr;
  int nfibers = 0;
  const Range* ranges = nullptr;
  int nranges = 0;
  Word* words = nullptr;
  const uintptr_t* spans = nullptr;  // the protected pages: [lo, hi) pairs
  int nspans = 0;
  uintptr_t dyn_hi = 0, dyn_end = 0;  // the slack after the dynamic shared memory
  uint64_t base = 1, next = 1;        // interval numbering, unique over the launch's blocks
  Hit race, past;                     // the first race; the first access past the dynamic size
  uintptr_t pending[8] = {};          // pages opened for the instruction being stepped
  int npending = 0;
  int unchecked = 0;  // SmemUnchecked depth
  uint64_t recorded = 0;
  struct sigaction old_segv{}, old_trap{};
};

// The functions below hidden: the signal handlers call none through the PLT.
#pragma GCC visibility push(hidden)

constexpr long kTrapFlag = 0x100;  // EFLAGS.TF

#ifdef CUDA_HOST_RACE_CHECK
// mprotect without libc: the handlers call nothing through the PLT, whose GOT may share a page
// with a static __shared__ array.
inline void sys_mprotect(uintptr_t a, size_t n, int prot) {
  long r;
  asm volatile("syscall"
               : "=a"(r)
               : "0"(10L), "D"(a), "S"(n), "d"(static_cast<long>(prot))
               : "rcx", "r11", "memory");
  (void)r;
}
#else
inline void sys_mprotect(uintptr_t a, size_t n, int prot) {
  mprotect(reinterpret_cast<void*>(a), n, prot);
}
#endif

inline void protect(const State& s, int prot) {
  for (int i = 0; i < s.nspans; ++i)
    sys_mprotect(s.spans[2 * i], s.spans[2 * i + 1] - s.spans[2 * i], prot);
}

inline bool in_spans(const State& s, uintptr_t a) {
  for (int i = 0; i < s.nspans; ++i)
    if (a >= s.spans[2 * i] && a < s.spans[2 * i + 1]) return true;
  return false;
}

// A and `me` conflict: different threads, not lanes of one warp ordered by a __syncwarp.
inline bool unordered(const Access& o, const Access& me) {
  return o.tid >= 0 && o.tid != me.tid && (o.tid / kWarp != me.tid / kWarp || me.epoch <= o.epoch);
}

// Records an access of thread tid at address a (ignored outside the shared memory).
inline void note(State& s, uintptr_t a, int tid, bool write) {
  const Range* r = nullptr;
  for (int i = 0; i < s.nranges && r == nullptr; ++i)
    if (a >= s.ranges[i].lo && a < s.ranges[i].hi) r = &s.ranges[i];
  const uint64_t gen = s.l->block_gen;
  const Access me{tid, s.fibers[tid].syncwarps};
  if (r == nullptr) {
    if (a >= s.dyn_hi && a < s.dyn_end && !s.past.any)
      s.past = Hit{true, a, me, {}, write, false, gen};
    return;
  }
  ++s.recorded;
  Word& w = s.words[r->word0 + (a >> 2) - (r->lo >> 2)];
  if (w.interval != s.base + gen) {
    w = Word{};
    w.interval = s.base + gen;
  }
  const auto hit = [&](const Access& o, bool o_write) {
    if (!s.race.any) s.race = Hit{true, a, o, me, o_write, write, gen};
  };
  if (unordered(w.w, me)) hit(w.w, true);
  if (write) {
    if (unordered(w.r0, me)) hit(w.r0, false);
    if (unordered(w.r1, me)) hit(w.r1, false);
    w.w = me;
  } else if (w.r0.tid < 0 || w.r0.tid == tid) {
    w.r0 = me;
  } else {
    w.r1 = me;
  }
}

// A fault the check does not own (outside shared memory, e.g. a stack overflow): everything
// opened, the previous handler back; the instruction faults again under it.
inline void give_up(State* s) {
  if (s != nullptr) {
    protect(*s, PROT_READ | PROT_WRITE);
    sigaction(SIGSEGV, &s->old_segv, nullptr);
  } else {
    signal(SIGSEGV, SIG_DFL);
  }
  globals().race = nullptr;
}

#ifdef CUDA_HOST_RACE_CHECK
inline void on_segv(int, siginfo_t* si, void* ctx) {
  State* s = globals().race;
  auto* uc = static_cast<ucontext_t*>(ctx);
  const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
  if (s == nullptr || si->si_code != SEGV_ACCERR || !in_spans(*s, a) || s->npending == 8)
    return give_up(s);
  const bool write = (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
  if (s->l->current != nullptr && s->unchecked == 0) note(*s, a, s->l->current->linear, write);
  // a read opens the page for reading only: the write of a read-modify-write faults again
  sys_mprotect(page_down(a), kPage, write ? PROT_READ | PROT_WRITE : PROT_READ);
  s->pending[s->npending++] = page_down(a);
  uc->uc_mcontext.gregs[REG_EFL] |= kTrapFlag;
}

inline void on_trap(int sig, siginfo_t*, void* ctx) {
  State* s = globals().race;
  auto* uc = static_cast<ucontext_t*>(ctx);
  if (s == nullptr || s->npending == 0) {  // not a step of ours: the previous handler's
    if (s != nullptr) {
      protect(*s, PROT_READ | PROT_WRITE);  // the PLT's GOT may share a protected page
      sigaction(SIGTRAP, &s->old_trap, nullptr);
    } else {
      signal(SIGTRAP, SIG_DFL);
    }
    raise(sig);
    return;
  }
  for (int i = 0; i < s->npending; ++i) sys_mprotect(s->pending[i], kPage, PROT_NONE);
  s->npending = 0;
  uc->uc_mcontext.gregs[REG_EFL] &= ~kTrapFlag;
}
#endif

// One launch under the check: the dynamic shared memory in pages of its own, the shadow words,
// the handlers and an alternate signal stack installed until the end of the launch.
class Session {
 public:
  Session(Launch& l, size_t dyn_bytes) {
    if (const char* why = unavailable())
      throw Error(std::string("cuda_host: the shared-memory race check is unavailable: ") + why);
    static const std::vector<Range> statics = read_static_smem();
    ranges_ = statics;
    if (dyn_bytes > 0) {
      dyn_map_bytes_ = page_up(dyn_bytes) + kPage;  // and a slack page: accesses past the size
      void* m = mmap(nullptr, dyn_map_bytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) throw Error("cuda_host: mmap of the dynamic shared memory failed");
      dyn_map_ = m;
      l.dyn = static_cast<unsigned char*>(m);
      Range r;
      r.lo = reinterpret_cast<uintptr_t>(m);
      r.hi = r.lo + dyn_bytes;
      ranges_.push_back(r);
      s_.dyn_hi = r.hi;
      s_.dyn_end = r.lo + dyn_map_bytes_;
    }
    size_t words = 0;
    std::vector<std::pair<uintptr_t, uintptr_t>> pages;
    for (Range& r : ranges_) {
      r.word0 = words;
      words += ((r.hi + 3) >> 2) - (r.lo >> 2);
      pages.emplace_back(page_down(r.lo), r.name.empty() ? s_.dyn_end : page_up(r.hi));
    }
    std::sort(pages.begin(), pages.end());
    for (const auto& p : pages) {
      if (!spans_.empty() && p.first <= spans_.back()) {
        spans_.back() = std::max(spans_.back(), p.second);
      } else {
        spans_.push_back(p.first);
        spans_.push_back(p.second);
      }
    }
    words_.assign(words, Word{});
    s_.l = &l;
    s_.fibers = l.fibers.data();
    s_.nfibers = static_cast<int>(l.fibers.size());
    s_.ranges = ranges_.data();
    s_.nranges = static_cast<int>(ranges_.size());
    s_.words = words_.data();
    s_.spans = spans_.data();
    s_.nspans = static_cast<int>(spans_.size() / 2);
    alt_ = mmap(nullptr, kAltStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (alt_ == MAP_FAILED) throw Error("cuda_host: mmap of the signal stack failed");
    stack_t ss{};
    ss.ss_sp = alt_;
    ss.ss_size = kAltStack;
    sigaltstack(&ss, &old_ss_);
#ifdef CUDA_HOST_RACE_CHECK
    struct sigaction sa{};
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sa.sa_sigaction = on_segv;
    sigaction(SIGSEGV, &sa, &s_.old_segv);
    sa.sa_sigaction = on_trap;
    sigaction(SIGTRAP, &sa, &s_.old_trap);
#endif
    globals().race = &s_;
    l.race = &s_;
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() {
    protect(s_, PROT_READ | PROT_WRITE);
    sigaction(SIGSEGV, &s_.old_segv, nullptr);
    sigaction(SIGTRAP, &s_.old_trap, nullptr);
    globals().race = nullptr;
    globals().race_recorded += s_.recorded;
    sigaltstack(&old_ss_, nullptr);
    munmap(alt_, kAltStack);
    if (dyn_map_ != nullptr) munmap(dyn_map_, dyn_map_bytes_);
    s_.l->race = nullptr;
    s_.l->dyn = nullptr;
  }

 private:
  static constexpr size_t kAltStack = size_t{64} << 10;
  State s_;
  std::vector<Range> ranges_;
  std::vector<Word> words_;
  std::vector<uintptr_t> spans_;
  void* dyn_map_ = nullptr;
  size_t dyn_map_bytes_ = 0;
  void* alt_ = nullptr;
  stack_t old_ss_{};
};

inline void block_begin(State& s) {
  s.base = s.next;
  protect(s, PROT_NONE);
}

inline void block_end(State& s) {
  protect(s, PROT_READ | PROT_WRITE);
  s.next = s.base + s.l->block_gen + 1;
  s.npending = 0;
}

inline std::string thread_name(const Launch& l, int tid) {
  const uint3 t = l.fibers[tid].tid;
  return "thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) +
         ")";
}

inline std::string describe(const State& s, uintptr_t a) {
  for (int i = 0; i < s.nranges; ++i) {
    const Range& r = s.ranges[i];
    if (a < r.lo || a >= r.hi) continue;
    const std::string off = " at byte offset " + std::to_string(a - r.lo);
    return r.name.empty() ? "dynamic shared memory" + off
                          : "static __shared__ " + demangle(r.name) + off;
  }
  return "shared memory";
}

// The first race or access past the dynamic size, as an error message; empty: none.
inline std::string message(const Launch& l, const State& s) {
  const std::string block = "block (" + std::to_string(l.block_idx.x) + "," +
                            std::to_string(l.block_idx.y) + "," + std::to_string(l.block_idx.z) +
                            ")";
  if (s.past.any)
    return "cuda_host: dynamic shared memory accessed past its size: " + block + " " +
           thread_name(l, s.past.first.tid) + (s.past.first_write ? " writes" : " reads") +
           " byte offset " + std::to_string(s.past.addr - (s.dyn_hi - l.dyn_bytes)) + " of " +
           std::to_string(l.dyn_bytes);
  if (!s.race.any) return "";
  const Hit& h = s.race;
  const bool warp = h.first.tid / kWarp == h.second.tid / kWarp;
  return "cuda_host: shared-memory race in " + block + ": " + thread_name(l, h.first.tid) +
         (h.first_write ? " wrote " : " read ") + describe(s, h.addr) + ", then " +
         thread_name(l, h.second.tid) + (h.second_write ? " wrote" : " read") +
         " it with no __syncthreads between (barrier interval " + std::to_string(h.gen) +
         ": after " + std::to_string(h.gen) + " __syncthreads" +
         (warp ? "; lanes of one warp, no __syncwarp between" : "") + ")";
}

}  // namespace race

// ------------------------------------------------- for layer code touching shared memory itself

// Records an access of [p, p + bytes) as thread `linear_thread` of the running block (in its
// current barrier interval and __syncwarp count), word by word, without touching the memory;
// addresses outside the shared memory are ignored. A no-op unless the race check is on.
inline void smem_access(const void* p, size_t bytes, bool write, int linear_thread) {
  race::State* s = globals().race;
  if (s == nullptr || bytes == 0) return;
  if (linear_thread < 0 || linear_thread >= s->nfibers)
    fail("cuda_host: smem_access as thread " + std::to_string(linear_thread) + " of a block of " +
         std::to_string(s->nfibers));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t w = a & ~uintptr_t{3}; w < a + bytes; w += 4)
    race::note(*s, std::max(w, a), linear_thread, write);
}

// While alive, the shared memory is open: the layer's own accesses (a collective's copies on
// behalf of lanes, atomics) neither fault nor count. Nests; not to be held across a barrier or a
// collective's wait (other fibers would run unchecked).
struct SmemUnchecked {
  SmemUnchecked() {
    if (race::State* s = globals().race; s != nullptr && s->unchecked++ == 0)
      race::protect(*s, PROT_READ | PROT_WRITE);
  }
  ~SmemUnchecked() {
    if (race::State* s = globals().race; s != nullptr && --s->unchecked == 0)
      race::protect(*s, PROT_NONE);
  }
  SmemUnchecked(const SmemUnchecked&) = delete;
  SmemUnchecked& operator=(const SmemUnchecked&) = delete;
};

// memcpy(dst, src, bytes) as thread `linear_thread`: the read of src and the write of dst are
// recorded where they are shared memory (smem_access), the copy done under SmemUnchecked.
inline void smem_copy_as(int linear_thread, void* dst, const void* src, size_t bytes) {
  smem_access(src, bytes, false, linear_thread);
  smem_access(dst, bytes, true, linear_thread);
  SmemUnchecked open;
  std::memcpy(dst, src, bytes);
}

#pragma GCC visibility pop
}  // namespace detail

// Turns the shared-memory race check on or off for the launches that follow (initially on where
// the environment has FASTATTN_CUDA_HOST_RACE=1). Throws Error where it is unavailable.
inline void set_race_check(bool on) {
  if (on && detail::race::unavailable() != nullptr)
    throw Error(std::string("cuda_host: the shared-memory race check is unavailable: ") +
                detail::race::unavailable());
  detail::globals().race_on = on ? 1 : 0;
}

inline bool race_check() {
  int& on = detail::globals().race_on;
  if (on < 0) {
    const char* e = std::getenv("FASTATTN_CUDA_HOST_RACE");
    on = e != nullptr && std::strcmp(e, "1") == 0;
  }
  return on != 0;
}

// The shared-memory accesses the race check recorded since the previous call.
inline uint64_t race_check_recorded() {
  const uint64_t n = detail::globals().race_recorded;
  detail::globals().race_recorded = 0;
  return n;
}

}  // namespace cuda_host
