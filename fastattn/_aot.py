"""Ahead-of-time compilation of every Triton kernel configuration for real GPU targets.

``python -m fastattn._aot [--cc 80 90]`` compiles each op's ``aot_specs()`` with ``triton.compile``
for ``GPUTarget("cuda", cc, 32)`` — no GPU needed — and prints one JSON line per compile: shared
memory used, cubin size, and whether the PTX uses tensor-core instructions. Run it without
``TRITON_INTERPRET`` (interpreted kernels cannot be lowered); the tests run it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

# Shared memory per block (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166_912, 90: 232_448}


def all_specs() -> Iterator[dict[str, Any]]:
    """Every (kernel, signature, constexprs, num_warps) the launchers can use, over all ops."""
    from fastattn.ops import _attention_triton, norm, softmax

    yield from softmax.aot_specs()
    yield from norm.aot_specs()
    yield from _attention_triton.aot_specs()


def compile_spec(spec: dict[str, Any], cc: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(spec["signature"])
    sig.update({k: "constexpr" for k in spec["constexprs"]})
    src = ASTSource(fn=spec["kernel"], signature=sig, constexprs=spec["constexprs"])
    target = GPUTarget("cuda", cc, 32)
    out = triton.compile(
        src,
        target=target,
        options={"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)},
    )
    ptx = out.asm["ptx"]
    return {
        "id": spec["id"],
        "cc": cc,
        "shared": out.metadata.shared,
        "smem_limit": SMEM_LIMIT[cc],
        "cubin_bytes": len(out.asm["cubin"]),
        "mma": "mma.sync" in ptx,
        "wgmma": "wgmma" in ptx,
    }


_SPECS: list[dict[str, Any]] = []  # filled before the worker processes fork


def _compile_one(task: tuple[int, int]) -> str:
    index, cc = task
    spec = _SPECS[index]
    try:
        return json.dumps(compile_spec(spec, cc))
    except Exception as e:  # report every failure, keep compiling the rest
        return json.dumps({"id": spec["id"], "cc": cc, "error": repr(e)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    _SPECS[:] = list(all_specs())
    tasks = [(i, cc) for i in range(len(_SPECS)) for cc in args.cc]
    if args.jobs <= 1:
        for line in map(_compile_one, tasks):
            print(line, flush=True)
        return 0
    import multiprocessing  # compiles are independent and CPU-bound; fork shares the specs

    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for line in pool.imap(_compile_one, tasks):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
