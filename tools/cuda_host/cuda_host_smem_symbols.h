// The static __shared__ arrays of the host execution layer's module, for its race check
// (cuda_host_race.h): found in the module's own ELF symbol table, since g++ ignores a section
// attribute on a template's function-local statics (all the kernels are templates). After
// cuda_host.h's launch state.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace cuda_host {
namespace detail {
namespace race {

struct Range {
  uintptr_t lo = 0, hi = 0;  // [lo, hi)
  size_t word0 = 0;          // its first shadow word
  std::string name;          // a static's mangled symbol; empty: the dynamic shared memory
};

// Function-local statics of the module's own functions outside the libraries (mangled _ZZ...,
// _ZZZ... in lambdas): the kernels' __shared__ arrays (device code allows no other static).
inline bool is_smem_symbol(const char* n) {
  if (std::strncmp(n, "_ZZ", 3) != 0) return false;
  n += 2;
  while (*n == 'Z') ++n;
  if (*n == 'N') {
    ++n;
    while (*n != '\0' && std::strchr("rVKRO", *n) != nullptr) ++n;  // cv / ref qualifiers
  }
  if (n[0] == 'S' && n[1] != '\0' && std::strchr("tabsiod", n[1]) != nullptr) return false;
  for (const char* ns : {"9cuda_host", "9__gnu_cxx", "3c10", "2at", "5torch", "10__cxxabiv1"})
    if (std::strncmp(n, ns, std::strlen(ns)) == 0) return false;
  return true;
}

// The static __shared__ arrays of this module, sorted by address (its ELF symbol table, read
// once).
inline std::vector<Range> read_static_smem() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&read_static_smem), &info) == 0 || info.dli_fname == nullptr)
    throw Error("cuda_host: race check: dladdr found no module for the layer");
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(info.dli_fname, "rb"), &std::fclose);
  if (!f) throw Error(std::string("cuda_host: race check: cannot read ") + info.dli_fname);
  std::string buf;
  char chunk[1 << 16];
  for (size_t n; (n = std::fread(chunk, 1, sizeof chunk, f.get())) > 0;) buf.append(chunk, n);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(buf.data());
  if (buf.size() < sizeof(Elf64_Ehdr) || std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
      eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      eh->e_shoff + eh->e_shnum * sizeof(Elf64_Shdr) > buf.size())
    throw Error(std::string("cuda_host: race check: not a 64-bit ELF file: ") + info.dli_fname);
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(buf.data() + eh->e_shoff);
  const uintptr_t base = eh->e_type == ET_DYN ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  std::vector<Range> out;
  bool symtab = false;
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
    symtab = true;
    const char* names = buf.data() + sh[sh[i].sh_link].sh_offset;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(buf.data() + sh[i].sh_offset);
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      const Elf64_Sym& y = sym[k];
      if (ELF64_ST_TYPE(y.st_info) != STT_OBJECT || y.st_size == 0 || y.st_shndx == SHN_UNDEF ||
          y.st_shndx >= eh->e_shnum || (sh[y.st_shndx].sh_flags & SHF_WRITE) == 0 ||
          !is_smem_symbol(names + y.st_name))
        continue;
      Range r;
      r.lo = base + y.st_value;
      r.hi = r.lo + y.st_size;
      r.name = names + y.st_name;
      out.push_back(std::move(r));
    }
  }
  if (!symtab)
    throw Error(std::string("cuda_host: race check: no symbol table in ") + info.dli_fname);
  std::sort(out.begin(), out.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
  out.erase(std::unique(out.begin(), out.end(),
                        [](const Range& a, const Range& b) { return a.lo == b.lo; }),
            out.end());
  return out;
}

inline std::string demangle(const std::string& mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(
      abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status), &std::free);
  return status == 0 && d ? std::string(d.get()) : mangled;
}

}  // namespace race
}  // namespace detail
}  // namespace cuda_host
