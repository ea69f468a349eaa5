"""Triton import shim and the launch helpers every Triton op shares.

Kernels are defined even when Triton is missing (they are then never run). Kernels cast every
loaded value to fp32 right away: the math is fp32 anyway, and the Triton interpreter miscomputes
raw bf16 arithmetic (it stores bf16 as uint16 bit patterns).

Launches: every grid is checked against CUDA's limits (``checked_grid``; the kernels put the
program count that grows with batch x heads on axis 0, the only one allowed past 65,535), made on
the current stream of the tensors' own GPU (``device_guard``: Triton launches on the current
device), and, for kernels tuned over tiles (``launch_tiled``), over the tiles whose compiled kernel
fits this GPU: no register spills and shared memory within its limit (``fitting``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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

# Blocks per grid axis on CUDA (any GPU since sm_30): x up to 2**31 - 1, y and z up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) of a tiled kernel.
Tile = tuple[int, int, int, int]
T = TypeVar("T")


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


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """Tiled kernels are autotuned on a GPU unless ``FASTATTN_AUTOTUNE=0`` (then, and in the
    interpreter, each launch takes the first tile of its list: the pinned one)."""
    return os.environ.get("FASTATTN_AUTOTUNE", "1") != "0" and not interpreting()


def needs_bf16_rounding(out: torch.Tensor) -> bool:
    """True when a kernel storing into ``out`` must round bf16 itself (interpreter only)."""
    return out.dtype == torch.bfloat16 and interpreting()


def device_guard(t: torch.Tensor) -> Any:
    """Makes ``t``'s GPU current for a launch (Triton launches on the current device, on its
    current stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def checked_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid``, or ValueError if an axis exceeds CUDA's limit (the launch would fail)."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if n > limit:
            raise ValueError(
                f"fastattn: a Triton launch grid of {tuple(grid)} programs exceeds CUDA's "
                f"limit of {limit} on axis {axis}"
            )
    return grid


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


# ------------------------------------------------------------------------- tiled launches
def fitting(cfgs: Sequence[T], usage: Callable[[T], tuple[bool, int] | None]) -> list[T]:
    """The configurations of ``cfgs`` (in order) that fit the device.

    ``usage(cfg)`` is ``(fits_shared_memory, spilled_bytes)`` of its compiled kernel, or None when
    unknown (the interpreter: nothing is compiled), which counts as fitting. Those within shared
    memory that spill are kept only when every one spills (spills cost speed, not correctness);
    when none is within shared memory, the first is returned, so that its launch raises
    Triton's OutOfResources.
    """
    use = [(c, usage(c)) for c in cfgs]
    clean = [c for c, u in use if u is None or (u[0] and u[1] == 0)]
    if clean:
        return clean
    launchable = [c for c, u in use if u is not None and u[0]]
    return launchable or list(cfgs[:1])


def tile_usage(
    kernel: Any, tile: Tile, grid: tuple[int, ...], args: Sequence[Any], kw: dict[str, Any]
) -> tuple[bool, int] | None:
    """(fits shared memory, spilled bytes) of ``kernel`` compiled with ``tile`` for these
    arguments on the current GPU (the JIT caches the compile for the launch), or None in the
    interpreter."""
    if interpreting():
        return None
    from triton.runtime.errors import OutOfResources

    m, n, w, s = tile
    compiled = kernel.warmup(*args, grid=grid, **kw, BLOCK_M=m, BLOCK_N=n, num_warps=w,
                             num_stages=s)  # fmt: skip
    try:
        compiled.run  # noqa: B018 - loads the module: checks shared memory, sets n_spills
    except OutOfResources:
        return False, 0
    return True, int(compiled.n_spills)


def _specialisation(args: Sequence[Any], kw: dict[str, Any]) -> tuple:
    """What selects a compiled kernel besides the tile (as Triton's JIT specialises: dtypes,
    16-byte alignment of pointers and ints, ints equal to 1, 64-bit ints, the constexprs)."""
    key: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            key.append(type(a).__name__)
        else:
            key.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
    return (*key, *sorted(kw.items()))


_FITTING: dict[tuple, list[Tile]] = {}
_TUNED: dict[tuple, Any] = {}


def launch_tiled(
    kernel: Any,
    tiles: list[Tile],
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    args: Sequence[Any],
    kw: dict[str, Any],
    *,
    keys: Sequence[str],
    reset: list[str] | None = None,
) -> None:
    """Launches ``kernel`` with one of ``tiles``: autotuned (by GPU time) among those that fit
    the GPU (``fitting``, decided once per specialisation), or the first that fits (pinned).
    ``grid(meta)`` gives the grid of a tile; ``keys`` name the arguments whose values join the
    autotune key (Triton adds the tensor dtypes); ``reset`` names outputs the kernel
    accumulates into (zeroed before each timed run)."""
    if len(tiles) > 1:
        device = -1 if interpreting() else torch.cuda.current_device()
        spec = (kernel.fn.__name__, tuple(tiles), device, _specialisation(args, kw))
        if spec not in _FITTING:
            usage = lambda t: tile_usage(kernel, t, grid({"BLOCK_M": t[0], "BLOCK_N": t[1]}),
                                         args, kw)  # fmt: skip
            _FITTING[spec] = fitting(tiles, usage)
        tiles = _FITTING[spec]
    if len(tiles) == 1 or not autotuning():
        m, n, w, s = tiles[0]
        g = checked_grid(grid({"BLOCK_M": m, "BLOCK_N": n}))
        kernel[g](*args, **kw, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
        return
    key = (kernel.fn.__name__, tuple(tiles))
    if key not in _TUNED:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles
        ]
        # Default benchmarker: GPU time by CUDA events on the current stream.
        _TUNED[key] = triton.autotune(configs, key=list(keys), reset_to_zero=reset)(kernel)
    _TUNED[key][lambda meta: checked_grid(grid(meta))](*args, **kw)
