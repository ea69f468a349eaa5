"""List the GPU code embedded in a CUDA extension (no cuobjdump needed), and check it.

    python tools/fatbin_list.py fastattn/_C.so [--require sm_80,sm_90a] [--kernel NAME ...]

Reads the ELF section ``.nv_fatbin`` of the shared object. It holds one or more fat binaries
(header magic 0xBA55ED50), each a list of entries: SASS (a cubin, itself an ELF) or PTX, for one
architecture. Prints one line per entry. ``--require`` names the SASS architectures that must be
present ("a" suffix: the arch-specific variant, e.g. sm_90a); ``--kernel`` names substrings of
kernel (mangled) names that every required SASS entry must contain. Exits 1 when one is missing.

Entry header layout (little endian), as written by nvcc's ``fatbinary``:
    0 u16 kind (1 PTX, 2 ELF)   4 u32 header size   8 u64 payload size
    28 u32 arch (e.g. 90)       40 u64 flags (0x2000 / 0x8000 compressed; 0x100000 arch-specific)
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass, field

FATBIN_MAGIC = 0xBA55ED50
KIND = {1: "PTX", 2: "SASS"}
FLAG_COMPRESSED = 0x2000 | 0x8000  # LZ4 / zstd payloads (nvcc --compress-mode)
FLAG_ARCH_SPECIFIC = 0x100000  # sm_90a, sm_100a, ...


@dataclass
class Entry:
    kind: str
    arch: int
    flags: int
    size: int
    kernels: list[str] = field(default_factory=list)  # empty when compressed or PTX

    @property
    def name(self) -> str:
        return f"sm_{self.arch}{'a' if self.flags & FLAG_ARCH_SPECIFIC else ''}"

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """{name: (offset, size)} of a 64-bit little-endian ELF image."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        headers.append((name, off, size))
    str_off = headers[shstrndx][1]
    out = {}
    for name, off, size in headers:
        end = data.index(b"\0", str_off + name)
        out[data[str_off + name : end].decode("ascii", "replace")] = (off, size)
    return out


def fatbin_entries(so_path: str) -> list[Entry]:
    with open(so_path, "rb") as f:
        data = f.read()
    sections = elf_sections(data)
    if ".nv_fatbin" not in sections:
        return []
    off, size = sections[".nv_fatbin"]
    blob = data[off : off + size]
    entries = []
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:  # padding between fat binaries
            pos += 8
            continue
        epos, end = pos + hsize, pos + hsize + fsize
        while epos + 48 <= end:
            kind, _, ehsize, esize = struct.unpack_from("<HHIQ", blob, epos)
            arch = struct.unpack_from("<I", blob, epos + 28)[0]
            flags = struct.unpack_from("<Q", blob, epos + 40)[0]
            e = Entry(KIND.get(kind, str(kind)), arch, flags, esize)
            payload = blob[epos + ehsize : epos + ehsize + esize]
            if e.kind == "SASS" and not e.compressed:
                e.kernels = sorted(
                    n[len(".text.") :] for n in elf_sections(payload) if n.startswith(".text.")
                )
            entries.append(e)
            epos += ehsize + esize
        pos = end
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("so", help="the shared object, e.g. .build-cuda/lib/fastattn/_C*.so")
    ap.add_argument("--require", default="", help="comma-separated SASS archs, e.g. sm_80,sm_90a")
    ap.add_argument("--kernel", action="append", default=[], help="kernel name substring")
    args = ap.parse_args(argv)

    entries = fatbin_entries(args.so)
    for e in entries:
        extra = " compressed" if e.compressed else f" kernels={len(e.kernels)}"
        print(f"  {e.kind:4} {e.name:8} {e.size:>9} B  flags=0x{e.flags:x}{extra}")
    ok = True
    for want in filter(None, args.require.split(",")):
        found = [e for e in entries if e.kind == "SASS" and e.name == want]
        if not found:
            print(f"MISSING: no SASS for {want}", file=sys.stderr)
            ok = False
            continue
        kernels = [k for e in found for k in e.kernels]
        if args.kernel and all(e.compressed for e in found):
            print(f"note: {want} SASS is compressed; kernel names not checked", file=sys.stderr)
            continue
        for sub in args.kernel:
            n = sum(sub in k for k in kernels)
            print(f"  {want}: {n} kernel(s) matching {sub!r}")
            if n == 0:
                print(f"MISSING: no kernel matching {sub!r} in the {want} SASS", file=sys.stderr)
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
