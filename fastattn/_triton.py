"""Triton import shim: kernels are defined even when Triton is missing (they are then never run).

Kernels cast every loaded value to fp32 right away: the math is fp32 anyway, and the Triton
interpreter miscomputes raw bf16 arithmetic (it stores bf16 as uint16 bit patterns).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton installed
    HAS_TRITON = False

    class _LanguageStub:
        constexpr = Any

    triton = None
    tl = _LanguageStub()


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` when Triton is importable, else the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


@jit
def round_to_bf16(y):
    """fp32 -> the nearest-even bf16 value (still fp32). Only for the interpreter, whose
    fp32 -> bf16 cast truncates; on a GPU the cast already rounds to nearest even."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(y != y, y, bits.to(tl.float32, bitcast=True))  # keep NaN as NaN


def needs_bf16_rounding(out: torch.Tensor) -> bool:
    """True when a kernel storing into ``out`` must round bf16 itself (interpreter only)."""
    return out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(t: torch.Tensor) -> Any:
    """Makes ``t``'s GPU current for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def row_launch_config(n_cols: int, max_single: int, loop_block: int) -> dict[str, Any]:
    """Launch parameters of a one-program-per-row kernel: rows of up to ``max_single`` elements
    are held in one power-of-two block (single pass), longer rows are looped in ``loop_block``
    chunks."""
    single = n_cols <= max_single
    block = next_power_of_2(max(n_cols, 1)) if single else loop_block
    # Enough warps that each thread holds at most ~32 row elements.
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return {"SINGLE": single, "BLOCK": block, "num_warps": num_warps}


def row_tiers(max_single: int) -> list[int]:
    """One row length per configuration ``row_launch_config`` can pick: every power-of-two
    single-pass block, then the looped kernel (for the AOT compile of every configuration)."""
    return [2**i for i in range(max_single.bit_length())] + [max_single + 1]


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
