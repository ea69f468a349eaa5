"""Ahead-of-time compilation of every Triton kernel configuration for real GPU targets.

``python -m fastattn._aot [--cc 80 90] [-k SUBSTRING]`` compiles each op's ``aot_specs()`` with
``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` — no GPU needed — twice: as is, and with the
specialisation Triton's JIT gives the usual run-time arguments (``aligned``: every pointer and
every stride and size argument ``s_*``, ``D``, ``Dv``, ``Sq``, ``Sk``, ``n_cols`` divisible by 16,
plus the spec's ``aligned_constexprs``, e.g. a unit stride; unless the spec says ``aligned_too``
False), which vectorises loads and lets sm_80+
stage tiles through shared memory with cp.async (more shared memory). It prints one JSON line per
compile: shared memory used, registers per thread and stack frame bytes (from ``cuobjdump
--dump-resource-usage`` of the cubin: a stack frame is where ptxas spills registers), cubin
size, and whether the PTX uses tensor-core instructions. Run it without ``TRITON_INTERPRET``
(interpreted kernels cannot be lowered); the tests run it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from fastattn._triton import interpreting, jit, tl

# Shared memory per block (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166_912, 90: 232_448}
# Integer arguments that are multiples of 16 in the usual (aligned) launch, besides strides s_*.
ALIGNED_INTS = ("D", "Dv", "Sq", "Sk", "n_cols")


@jit
def _spill_canary(X, BLOCK: tl.constexpr):
    """Keeps BLOCK fp32 values live across a reduction: 512 per thread at one warp, which
    ptxas can only fit by spilling (the canary that shows the stack check sees spills)."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(X + offs, x / tl.sum(x * x, 0))


CANARY = {
    "id": "canary_spill",
    "kernel": _spill_canary,
    "signature": {"X": "*fp32"},
    "constexprs": {"BLOCK": 32 * 512},
    "num_warps": 1,
    "aligned_too": False,
}


def all_specs() -> Iterator[dict[str, Any]]:
    """Every (kernel, signature, constexprs, num_warps) the launchers can use, over all ops."""
    from fastattn.ops import _attention_triton_aot, norm, paged_triton, softmax

    yield from softmax.aot_specs()
    yield from norm.aot_specs()
    yield from _attention_triton_aot.aot_specs()
    yield from paged_triton.aot_specs()


def aligned_args(spec: dict[str, Any]) -> list[str]:
    """The arguments the aligned specialisation marks divisible by 16."""
    cx = spec.get("aligned_constexprs", {})
    return [
        a
        for a, ty in spec["signature"].items()
        if a not in cx and (ty.startswith("*") or a.startswith("s_") or a in ALIGNED_INTS)
    ]


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack frame bytes of the one kernel in ``cubin``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-500:]}")
    return {"regs": int(found.group(1)), "stack": int(found.group(2))}


def compile_spec(spec: dict[str, Any], cc: int, aligned: bool = False) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["kernel"]
    constexprs = dict(spec["constexprs"])
    attrs = {}
    if aligned:
        constexprs.update(spec.get("aligned_constexprs", {}))
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned_args(spec)}
    sig = dict(spec["signature"])
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    out = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)},
    )
    ptx = out.asm["ptx"]
    return {
        "id": spec["id"],
        "cc": cc,
        "aligned": aligned,
        "shared": out.metadata.shared,
        "smem_limit": SMEM_LIMIT[cc],
        **resource_usage(out.asm["cubin"]),
        "cubin_bytes": len(out.asm["cubin"]),
        "mma": "mma.sync" in ptx,
        "wgmma": "wgmma" in ptx,
    }


_SPECS: list[dict[str, Any]] = []  # filled before the worker processes fork


def _compile_one(task: tuple[int, int, bool]) -> str:
    index, cc, aligned = task
    spec = _SPECS[index]
    try:
        return json.dumps(compile_spec(spec, cc, aligned))
    except Exception as e:  # report every failure, keep compiling the rest
        return json.dumps({"id": spec["id"], "cc": cc, "aligned": aligned, "error": repr(e)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    parser.add_argument("-k", default="", help="only the specs whose id contains this")
    parser.add_argument("--canary", action="store_true", help="also a kernel that must spill")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes"
    )
    args = parser.parse_args(argv)
    if interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    _SPECS[:] = [s for s in all_specs() if args.k in s["id"]] + ([CANARY] if args.canary else [])
    # The slow compiles (attention, last in the list) first, so that no worker idles at the end.
    tasks = [(i, cc, a) for i in reversed(range(len(_SPECS))) for cc in args.cc
             for a in (False, True) if not a or _SPECS[i].get("aligned_too", True)]  # fmt: skip
    if args.jobs <= 1:
        for line in map(_compile_one, tasks):
            print(line, flush=True)
        return 0
    import multiprocessing  # compiles are independent and CPU-bound; fork shares the specs

    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for line in pool.imap_unordered(_compile_one, tasks):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
