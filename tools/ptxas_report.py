"""Check the CUDA kernels' resource usage as ptxas reports it (nvcc -Xptxas -v), and tabulate it.

    python tools/ptxas_report.py BUILD_LOG --cu csrc/cuda/*.cu --store DIR --out TABLE.md \\
        [--arch sm_80,sm_90a] [--kernel NAME ...]

Reads the log of a torch extension build (ninja -v: each command after its "[i/n]" line, its
output below it) made with FASTATTN_NVCC_VERBOSE=1 (setup.py). Per kernel instantiation and
architecture: registers, spill stores / loads, static shared memory and stack frame. Fails (exit
1, one line per failure) on any spill (bytes spilled to local memory: slow, and a sign the
configuration needs fewer values per thread), on static shared memory over 48 KiB, on dynamic
shared memory (DYNAMIC_SMEM) past the launch's limit, and when an --arch or --kernel (a substring
of the mangled name, as in tools/fatbin_list.py) has no entry. Writes a summary table (per kernel
and arch) and the full table (per instantiation) to --out and prints the summary.

ninja only recompiles a changed source, so the log may hold some .cu files' ptxas output or none:
each compiled .cu's lines are kept in --store (DIR/<stem>.ptxas) and the report reads every --cu
file's from there. A .cu without a record (its object was built without -Xptxas -v) fails: remove
the build's temp dir to recompile it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
STATIC_SMEM_LIMIT = 48 * KIB  # static __shared__ per block, every arch
DEFAULT_SMEM_LIMIT = 48 * KIB  # static + dynamic per block without the opt-in attribute
# Static + dynamic shared memory a block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize;
# the CUDA programming guide's per-compute-capability table): sm_80 163 KiB, sm_90 227 KiB.
OPTIN_SMEM_LIMIT = {80: 163 * KIB, 90: 227 * KIB}

# Dynamic shared memory is not in ptxas's output: the most each kernel's launcher requests, and
# whether it opts in past 48 KiB. OPTIN_REST: the launcher asks for the arch's opt-in limit less
# the kernel's static smem (common.cuh's max_dynamic_smem), so only static <= opt-in is checked.
# A kernel not listed here launches without dynamic shared memory.
OPTIN_REST = -1
DYNAMIC_SMEM: dict[str, tuple[int, bool]] = {
    # bwd_plan (norm_kernels.cuh): 8 warps' column sums, n <= 128 (VEC < 8) or 64 (VEC 8) vectors
    # of VEC elements, in the math type: 8 * 512 * 4 (fp32, fp16/bf16) = 8 * 256 * 8 (fp64) bytes.
    "norm_bwd_reg_kernel": (16 * KIB, False),
    # softmax.cu: the row's logits while they fit (else the online path, no dynamic smem).
    "softmax_fwd_block_kernel": (OPTIN_REST, True),
    # attention_kernels.cuh AttnTile: (64 + 4 * 32) rows of 264 fp16 at head_dim 256, the largest
    # tier ((64 + 4 * 64) * 136 * 2 at 128, (64 + 4 * 64) * 72 * 2 at 64).
    "attention_fwd_kernel": (101376, True),
}

# Spills of the softmax / norm kernels measured when the check was added (nvcc 13.0), as
# (instantiation, arch) -> bytes stored: a few bytes of local memory each, in float64 and one
# bf16 row length, well under their launch bounds' register caps. Listed so that any new spill,
# or more bytes here, still fails; the attention kernels are not listed and must not spill.
KNOWN_SPILLS: dict[tuple[str, str], int] = {
    ("norm_bwd_reg_kernel<float, float, 4, 2>", "sm_80"): 8,
    ("norm_fwd_reg_kernel<c10::BFloat16, c10::BFloat16, 8, 1>", "sm_90a"): 4,
    ("norm_fwd_reg_kernel<double, double, 1, 4>", "sm_80"): 12,
    ("norm_fwd_reg_kernel<double, double, 1, 4>", "sm_90a"): 16,
    ("norm_fwd_reg_kernel<double, double, 2, 4>", "sm_90a"): 4,
    ("softmax_fwd_block_kernel<double, 2>", "sm_90a"): 16,
}

NINJA_STEP = re.compile(r"^\[\d+/\d+\] ")
CU_SOURCE = re.compile(r"\s-c\s+\S*?([^/\s]+)\.cu(\s|$)")
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Usage:
    mangled: str
    arch: str  # as ptxas names it: sm_80, sm_90a
    registers: int = -1  # -1: no "Used N registers" line (yet)
    smem: int = 0  # static shared memory, bytes
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""  # short (demangled) name

    @property
    def cc(self) -> int:
        return int(re.sub(r"\D", "", self.arch))


def split_log(text: str) -> dict[str, list[str]]:
    """{.cu stem: the ptxas lines of its compile} for every .cu compiled in a ninja -v log."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if NINJA_STEP.match(line):
            m = CU_SOURCE.search(line)
            current = out.setdefault(m.group(1), []) if m else None
        elif current is not None and ("ptxas" in line or FRAME.search(line)):
            current.append(line)
    return out


def parse(lines: list[str]) -> list[Usage]:
    """One Usage per 'Compiling entry function' of ptxas -v output."""
    out: list[Usage] = []
    cur: Usage | None = None
    props_of = ""
    for line in lines:
        if m := ENTRY.search(line):
            cur = Usage(m.group(1), m.group(2))
            out.append(cur)
        elif m := PROPS.search(line):
            props_of = m.group(1)  # also printed for non-entry (called) functions
        elif (m := FRAME.search(line)) and cur is not None and props_of == cur.mangled:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        elif (m := USED.search(line)) and cur is not None:
            cur.registers = int(m.group(1))
            s = SMEM.search(line)
            cur.smem = int(s.group(1)) if s else 0
    for u in out:
        if u.registers < 0:
            raise ValueError(f"ptxas output of {u.mangled} for {u.arch} has no 'Used N registers'")
    return out


def short_names(usages: list[Usage], kernels: list[str]) -> None:
    """Sets each name: the demangled name less namespaces and parameters (c++filt, when on
    PATH), else the first of `kernels` in the mangled name, else the mangled name."""
    demangled = [u.mangled for u in usages]
    if usages and shutil.which("c++filt"):
        res = subprocess.run(
            ["c++filt"], input="\n".join(demangled), capture_output=True, text=True, check=True
        )
        demangled = res.stdout.splitlines()
    for u, d in zip(usages, demangled, strict=True):
        if d != u.mangled:
            d = re.sub(r"\(anonymous namespace\)::|fastattn::cuda::|^void ", "", d)
            depth = 0
            for i, ch in enumerate(d):  # the parameter list: the first "(" outside <...>
                depth += {"<": 1, ">": -1}.get(ch, 0)
                if ch == "(" and depth == 0:
                    d = d[:i]
                    break
            u.name = d
        else:
            u.name = next((k for k in kernels if k in u.mangled), u.mangled)


def family(u: Usage, kernels: list[str]) -> str:
    return next((k for k in kernels if k in u.mangled), u.name.split("<")[0])


def failures(
    usages: list[Usage],
    archs: list[str],
    kernels: list[str],
    dynamic: dict[str, tuple[int, bool]] | None = None,
    known_spills: dict[tuple[str, str], int] | None = None,
) -> list[str]:
    """Every broken rule, as one line each (none: the build passes)."""
    dynamic = DYNAMIC_SMEM if dynamic is None else dynamic
    out = []
    if not usages:
        out.append("no ptxas entries (was the build made with FASTATTN_NVCC_VERBOSE=1?)")
    for arch in archs:
        for k in kernels or [""]:
            if not any(u.arch == arch and k in u.mangled for u in usages):
                out.append(f"{k or 'no kernel'} has no ptxas entry for {arch}")
    for u in usages:
        where = f"{u.name} on {u.arch}"
        known = (
            KNOWN_SPILLS.get((u.name, u.arch), 0)
            if known_spills is None
            else (known_spills.get((u.name, u.arch), 0))
        )
        if max(u.spill_stores, u.spill_loads) > known:
            out.append(
                f"{where} spills: {u.spill_stores} B stores, {u.spill_loads} B loads "
                f"({u.registers} registers)"
            )
        if u.smem > STATIC_SMEM_LIMIT:
            out.append(f"{where}: {u.smem} B static shared memory > {STATIC_SMEM_LIMIT}")
        for k, (dyn, optin) in dynamic.items():
            if k not in u.mangled:
                continue
            limit = OPTIN_SMEM_LIMIT.get(u.cc) if optin else DEFAULT_SMEM_LIMIT
            if limit is None:
                out.append(f"{where}: no opt-in shared memory limit known for {u.arch}")
                continue
            total = u.smem + (0 if dyn == OPTIN_REST else dyn)
            if total > limit:
                out.append(f"{where}: {u.smem} B static + {max(dyn, 0)} B dynamic > {limit}")
    return out


def tables(usages: list[Usage], kernels: list[str]) -> tuple[str, str]:
    """(summary per kernel and arch, one row per instantiation), as markdown."""
    cols = "registers | static smem (B) | stack (B) | spill st/ld (B) |\n"
    groups: dict[tuple[str, str], list[Usage]] = {}
    for u in usages:
        groups.setdefault((family(u, kernels), u.arch), []).append(u)
    summary = f"| kernel | arch | instances | {cols}" + "| --- " * 7 + "|\n"
    for (k, arch), us in sorted(groups.items()):
        regs = sorted({u.registers for u in us})
        span = f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}–{regs[-1]}"
        summary += (
            f"| {k} | {arch} | {len(us)} | {span} | {max(u.smem for u in us)} | "
            f"{max(u.stack for u in us)} | {sum(u.spill_stores for u in us)}/"
            f"{sum(u.spill_loads for u in us)} |\n"
        )
    detail = f"| kernel | arch | {cols}" + "| --- " * 6 + "|\n"
    for u in sorted(usages, key=lambda u: (family(u, kernels), u.name, u.arch)):
        detail += (
            f"| `{u.name}` | {u.arch} | {u.registers} | {u.smem} | {u.stack} | "
            f"{u.spill_stores}/{u.spill_loads} |\n"
        )
    return summary, detail


def collect(log: Path, cu: list[Path], store: Path) -> tuple[list[Usage], list[str]]:
    """The usages of every `cu` source (this log's compiles, else the store's record; the log's
    are stored), and a failure line per source without either."""
    store.mkdir(parents=True, exist_ok=True)
    for stem, lines in split_log(log.read_text(errors="replace")).items():
        (store / f"{stem}.ptxas").write_text("".join(f"{ln}\n" for ln in lines))
    usages, missing = [], []
    for src in cu:
        rec = store / f"{src.stem}.ptxas"
        if rec.exists():
            usages += parse(rec.read_text().splitlines())
        else:
            missing.append(f"{src.name}: no ptxas output recorded (remove the build's temp dir)")
    return usages, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--cu", type=Path, nargs="+", required=True, help="the .cu sources built")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="", help="comma-separated, e.g. sm_80,sm_90a")
    ap.add_argument("--kernel", action="append", default=[])
    args = ap.parse_args(argv)
    usages, bad = collect(args.log, args.cu, args.store)
    short_names(usages, args.kernel)
    archs = [a for a in args.arch.split(",") if a]
    bad += failures(usages, archs, args.kernel)
    summary, detail = tables(usages, args.kernel)
    args.out.write_text(f"{summary}\n{detail}")
    print(summary, end="")
    print(f"  ({len(usages)} kernel instantiations; one row each: {args.out})")
    for line in bad:
        print(f"  FAIL {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
