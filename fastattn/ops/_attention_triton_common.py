"""What the Triton forward and backward attention kernels share (docs/attention.md has the
contract, ``_attention_triton.py`` the algorithm, grids and offset rules): the in-kernel tile
helpers (the dropout hash, the masked and scaled score tile), the tile configurations per head-dim
tier, and the launch-argument helpers. The surface is ``__all__``; the kernels and launchers are
in ``_attention_triton.py`` (forward) and ``_attention_triton_bwd.py`` (backward).
"""

from __future__ import annotations

from typing import Any

import torch

from fastattn import reference
from fastattn._triton import Tile, jit, tl, triton
from fastattn._triton import next_power_of_2 as _p2
from fastattn.ops import opcall

__all__ = [
    "LN2",
    "LOG2E",
    "MAX_SPLITS",
    "SPLIT_MAX_SQ",
    "TUNE_KEYS",
    "blocks_grid",
    "decode_splits",
    "dkdv_configs",
    "dot_precision",
    "dq_configs",
    "dropout_args",
    "dropout_keep",
    "fwd_configs",
    "head_block",
    "head_tier",
    "kv_tier",
    "mask_args",
    "new_tensor",
    "seq_class",
    "split_config",
    "tanh",
    "tile_scores",
    "variant_args",
    "window_visible",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ------------------------------------------------------------------------ in-kernel helpers
# fmt: off
@jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@jit
def dropout_keep(RNG, grow, cols, thr, KEYS_FIRST: tl.constexpr):
    """Dropout keep-mask (BLOCK_M, BLOCK_N) of global rows ``grow`` = (b*H + h)*Sq + i and key
    columns ``cols`` (the hash of reference.py); (BLOCK_N, BLOCK_M) when ``KEYS_FIRST``."""
    seed0 = tl.load(RNG).to(tl.uint32)
    seed1 = tl.load(RNG + 1).to(tl.uint32)
    a = _mix32(grow.to(tl.uint32) ^ seed0)
    c = cols.to(tl.uint32) + seed1
    if KEYS_FIRST:
        r = _mix32(a[None, :] ^ c[:, None])
    else:
        r = _mix32(a[:, None] ^ c[None, :])
    return (r >> 8) >= thr  # thr (int32, < 2**25) promotes to uint32


@jit
def tanh(x):
    """tanh in fp32 to ~3.5 ulp: the CPU kernels' rational function (csrc/cpu/vec_math_impl.h:
    x P(x^2) / Q(x^2) on |x| <= 9, degrees 5 / 3, clamped to [-1, 1]); plain arithmetic, so the
    interpreter and every GPU compute the same. NaN stays NaN."""
    xc = tl.minimum(tl.maximum(x, -9.0), 9.0)
    xc = tl.where(x != x, x, xc)
    u = xc * xc
    p = 1.9242380258632785e-11
    p = p * u - 1.3182353875151875e-08
    p = p * u + 9.406467142980546e-06
    p = p * u + 0.0029364018701016903
    p = p * u + 0.12933944165706635
    p = p * u + 1.0
    d = 0.0002302375214640051 * u + 0.02382768504321575
    d = d * u + 0.46267253160476685
    d = d * u + 1.0
    y = xc * p / d
    return tl.where(y != y, y, tl.minimum(tl.maximum(y, -1.0), 1.0))


@jit
def window_visible(qi, cols, causal_offset, win_left, win_right):
    """(BLOCK_M, BLOCK_N): key ``cols[j]`` inside the window of query ``qi[i]`` (a bound of -1:
    none): ``qi + off - left <= col <= qi + off + right``."""
    diag = qi[:, None] + causal_offset
    ok = (win_left < 0) | (cols[None, :] >= diag - win_left)
    return ok & ((win_right < 0) | (cols[None, :] <= diag + win_right))


@jit
def tile_scores(q, kt, M, m_row, qi, r_ok, cols, Sk, causal_offset, qk_scale, s_mn,
                slope2, cap2, win_left, win_right,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                PREC: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                WINDOW: tl.constexpr):
    """(scores, tanh) of a (BLOCK_M, BLOCK_N) tile in log2 units; scores -inf where masked or out
    of bounds. Row r is query ``qi[r]`` and its mask row starts at element ``m_row[r]``
    (int64). In order (docs/attention.md): the softcap ``cap2 * tanh(s / cap2)`` (cap2 = c *
    log2(e); tanh is returned for the backward's derivative, 0 without a softcap), the ALiBi
    bias ``-slope2[r] * |qi + off - col|`` (slopes times log2(e)), the mask, the causal and
    window limits."""
    s = tl.dot(q, kt, input_precision=PREC) * qk_scale
    th = 0.0
    if SOFTCAP:
        th = tanh(s / cap2)
        s = th * cap2
    if ALIBI:
        rel = (qi[:, None] + causal_offset - cols[None, :]).to(tl.float32)
        s -= slope2[:, None] * tl.abs(rel)
    valid = r_ok[:, None] & (cols < Sk)[None, :]
    if HAS_MASK:
        mp = M + m_row[:, None] + cols.to(tl.int64)[None, :] * s_mn
        if MASK_BOOL:  # added as 0 / -inf, as torch and the CPU kernel: a NaN score stays NaN
            keep = tl.load(mp, mask=valid, other=0).to(tl.int32) != 0
            s += tl.where(keep, 0.0, float("-inf"))
        else:
            s += tl.load(mp, mask=valid, other=0.0).to(tl.float32) * 1.4426950408889634
    if CAUSAL:
        valid = valid & (cols[None, :] <= qi[:, None] + causal_offset)
    if WINDOW:
        valid = valid & window_visible(qi, cols, causal_offset, win_left, win_right)
    return tl.where(valid, s, float("-inf")), th


# ------------------------------------------------------------------------- configurations
# Tiles per head-dim tier (BLOCK_D <= 64, <= 128, 256): (BLOCK_M, BLOCK_N, warps, stages).
# The AOT compile (tests/test_triton_aot.py, every feature on: the most registers) checks, for
# sm_80 and sm_90, that every fp16/bf16 tile fits shared memory and spills no register in the
# aligned specialisation (16-byte aligned pointers and strides: the usual launch), and that each
# list ends with a tile that does not spill unaligned either (pointers or strides not multiples
# of 16: no vector loads, so register-hungry), which ``launch_tiled`` falls back to: at run time
# it drops the tiles whose compiled kernel spills or exceeds the GPU's shared memory. The first
# tile that fits is the pinned one (FASTATTN_AUTOTUNE=0 and the interpreter).
FWD_CONFIGS: dict[int, list[Tile]] = {
    64: [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    128: [(64, 32, 8, 2), (64, 16, 8, 2)],  # (128, 32, 8, 2) spills with a bool mask (bf16)
    256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)],
}
# Backward: dK/dV kernel (BLOCK_N keys held, BLOCK_M query rows streamed; with the atomic dQ of
# the default, non-deterministic backward) and dQ kernel (BLOCK_M rows held).
DKDV_CONFIGS: dict[int, list[Tile]] = {
    64: [(32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 8, 2)],
    128: [(32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 8, 1)],
    256: [(32, 16, 8, 1), (16, 16, 8, 1)],
}
DQ_CONFIGS: dict[int, list[Tile]] = {
    64: [(64, 32, 4, 2), (32, 64, 4, 2), (64, 16, 4, 2)],
    128: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)],
    256: [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 1)],
}
# fp32 (rare; one pinned tile each, never autotuned): tiles of twice the bytes, tf32x3 dots
# (operands split in two). At head dim 128/256 (dK/dV: every tier) even 16x16 tiles spill on
# sm_80/sm_90; these are the tiles that spill least (tests/test_triton_aot.py lists them).
FWD_CONFIGS_FP32: dict[int, list[Tile]] = {64: [(64, 16, 4, 2)], 128: [(32, 16, 4, 2)],
                                           256: [(16, 16, 4, 1)]}  # fmt: skip
DKDV_CONFIGS_FP32: dict[int, list[Tile]] = {64: [(32, 32, 8, 1)], 128: [(16, 16, 8, 1)],
                                            256: [(16, 16, 8, 1)]}  # fmt: skip
DQ_CONFIGS_FP32: dict[int, list[Tile]] = {64: [(32, 16, 4, 1)], 128: [(16, 16, 4, 1)],
                                          256: [(16, 16, 8, 1)]}  # fmt: skip
# Decode split-K forward (memory-bound: small tiles cost little), one tile each.
SPLIT_CONFIG: dict[int, Tile] = {64: (64, 32, 8, 2), 128: (64, 16, 8, 2), 256: (16, 16, 4, 2)}
SPLIT_CONFIG_FP32: dict[int, Tile] = {64: (16, 32, 4, 2), 128: (16, 16, 4, 2),
                                      256: (16, 16, 4, 2)}  # fmt: skip
SPLIT_MAX_SQ = 64  # split-K for at most this many query rows
MAX_SPLITS = 64


# With a window, softcap, ALiBi or sinks on, a second score tile stays live (the softcap's tanh
# for the backward's derivative, the ALiBi distances): the lists of these (kernel, fp32, tier)
# whose tiles then spill are replaced by tiles that do not (the AOT variant specs check them).
VARIANT_CONFIGS: dict[tuple[str, bool, int], list[Tile]] = {
    ("fwd", False, 256): [(64, 16, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("fwd", True, 128): [(16, 16, 4, 2)],
    ("dkdv", False, 64): [(16, 64, 8, 2), (16, 32, 8, 2)],
    ("dkdv", False, 256): [(16, 16, 8, 1)],
    ("dq", False, 128): [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 8, 2)],
    ("split", True, 64): [(16, 16, 4, 2)],
}


# With a value head dim of its own, (kind, fp32, BLOCK_D, BLOCK_DV) whose tier's tiles spill
# (the AOT "d<BLOCK_D>v<BLOCK_DV>" specs, measured on sm_80/sm_90), with or without variants:
# 32 / 16 (tier 64) spills in the 64 x 64 x 4-warp forward tile and the fp32 split tile on
# sm_90; 256 / 128 in the variants' dK/dV tile on sm_80.
DV_CONFIGS: dict[tuple[str, bool, int, int], list[Tile]] = {
    ("fwd", False, 32, 16): [(64, 64, 8, 2), (64, 32, 8, 2)],
    ("split", True, 32, 16): [(16, 16, 4, 2)],
    ("dkdv", False, 256, 128): [(32, 16, 8, 1), (16, 16, 8, 2)],
}
Blocks = tuple[int, int]  # (BLOCK_D, BLOCK_DV)


def _own_tiles(kind: str, dtype: torch.dtype, tier: int, variants: bool,
               blocks: Blocks | None) -> list[Tile]:  # fmt: skip
    """The DV_CONFIGS list of (kind, dtype, blocks) when v has a head dim of its own, else the
    VARIANT_CONFIGS one of (kind, dtype, tier) when the variants are on, else []."""
    fp32 = dtype == torch.float32
    own = DV_CONFIGS.get((kind, fp32, *blocks), []) if blocks and blocks[0] != blocks[1] else []
    return own or (VARIANT_CONFIGS.get((kind, fp32, tier), []) if variants else [])


def fwd_configs(dtype: torch.dtype, tier: int, variants: bool = False,
                blocks: Blocks | None = None) -> list[Tile]:  # fmt: skip
    own = _own_tiles("fwd", dtype, tier, variants, blocks)
    return own or (FWD_CONFIGS_FP32 if dtype == torch.float32 else FWD_CONFIGS)[tier]


def dkdv_configs(dtype: torch.dtype, tier: int, variants: bool = False,
                 blocks: Blocks | None = None) -> list[Tile]:  # fmt: skip
    own = _own_tiles("dkdv", dtype, tier, variants, blocks)
    return own or (DKDV_CONFIGS_FP32 if dtype == torch.float32 else DKDV_CONFIGS)[tier]


def dq_configs(dtype: torch.dtype, tier: int, variants: bool = False,
               blocks: Blocks | None = None) -> list[Tile]:  # fmt: skip
    own = _own_tiles("dq", dtype, tier, variants, blocks)
    return own or (DQ_CONFIGS_FP32 if dtype == torch.float32 else DQ_CONFIGS)[tier]


def split_config(dtype: torch.dtype, tier: int, variants: bool = False,
                 blocks: Blocks | None = None) -> Tile:  # fmt: skip
    own = _own_tiles("split", dtype, tier, variants, blocks)
    return own[0] if own else (SPLIT_CONFIG_FP32 if dtype == torch.float32 else SPLIT_CONFIG)[tier]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 tiles as three TF32 products (near-fp32 accuracy on tensor
    cores); fp16/bf16 tiles ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def head_tier(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def head_block(d: int) -> int:
    return max(16, _p2(d))


def kv_tier(block_d: int, block_dv: int) -> int:
    """The tile tier of head dims (BLOCK_D, BLOCK_DV): every kernel holds tiles of both (q and
    the output accumulator; k, v, dk, dv; q, dO, dq) and streams the others, so the larger one
    sizes them (a value head dim of its own, docs/attention.md)."""
    return head_tier(max(block_d, block_dv))


# Autotune keys: the feature flags, then seq_class: the sequence lengths by powers of two, so
# that one shape does not pick the tile of every other (exact lengths would re-tune at every
# new length). Triton adds the dtypes of the tensor arguments.
TUNE_KEYS = ["BLOCK_D", "BLOCK_DV", "OWN_DV", "CAUSAL", "HAS_MASK", "DROPOUT", "MASK_GRAD",
             "ATOMIC_DQ", "SOFTCAP", "ALIBI", "WINDOW", "SINKS", "seq_class"]  # fmt: skip


def seq_class(sq: int, sk: int) -> int:
    """The autotune bucket of (seqlen_q, seqlen_k): their ceil(log2), packed in one int (an
    argument the kernels take and ignore, for the autotune key)."""
    return (max(sq, 1) - 1).bit_length() * 64 + (max(sk, 1) - 1).bit_length()


def blocks_grid(n_rows: int, heads: int, block: str = "BLOCK_M", splits: int = 1) -> Any:
    """Grid (of a tile ``meta``) of a kernel with one program per block of ``meta[block]`` of
    the ``n_rows`` rows of each of ``heads`` heads, on axis 0 (the blocks of a head fastest, as
    the kernels decode it), and ``splits`` key splits on axis 2."""
    return lambda meta: (triton.cdiv(n_rows, meta[block]) * heads, 1, splits)


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return opcall.new_output(torch.empty(shape, dtype=dtype, device=device))


def mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, list[int], dict]:
    if mask is None:
        return q, [0, 0, 0, 0], {"HAS_MASK": False, "MASK_BOOL": False}
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    flags = {"HAS_MASK": True, "MASK_BOOL": mask.dtype == torch.bool}
    return m, list(m.stride()), flags


def variant_args(
    q: torch.Tensor,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: torch.Tensor | None,
    alibi: torch.Tensor | None,
) -> tuple[list[Any], dict[str, bool]]:
    """The kernels' variant arguments (SINKS, ALIBI pointers, ALiBi strides, cap2 = softcap *
    log2(e), the window bounds) and flags. Sinks (H,) and slopes (B, H) are float32."""
    window = window_left >= 0 or window_right >= 0
    al = q if alibi is None else alibi
    al_str = [0, 0] if alibi is None else [alibi.stride(0), alibi.stride(1)]
    cap2 = (softcap if softcap > 0.0 else 1.0) * LOG2E  # (1.0: unread without a softcap)
    args = [q if sinks is None else sinks, al, *al_str, cap2, window_left, window_right]
    flags = {"SOFTCAP": softcap > 0.0, "ALIBI": alibi is not None, "WINDOW": window,
             "SINKS": sinks is not None}  # fmt: skip
    return args, flags


def dropout_args(dropout_p: float, rng: torch.Tensor | None, q: torch.Tensor) -> tuple:
    if dropout_p <= 0.0:
        return q, 1.0, 0, False
    assert rng is not None, "dropout_p > 0 needs the rng seeds"
    keep = 1.0 - dropout_p
    return rng, (1.0 / keep if keep > 0.0 else 0.0), reference.dropout_threshold(dropout_p), True


def decode_splits(q: torch.Tensor, programs: int, sk: int, block_n: int) -> int:
    """Key splits of a decode forward: enough programs to fill the GPU twice, >= 2 blocks each."""
    sms = 8 if not q.is_cuda else torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= sms or sk < 4 * block_n:
        return 1
    return max(1, min(MAX_SPLITS, -(-2 * sms // programs), sk // (2 * block_n)))
