"""Triton kernels of exact attention (FlashAttention-2 style): the shared tile helpers, the
forward kernels and their launcher ``triton_forward``, and the tile configurations; the backward
kernels and ``triton_backward`` live in ``_attention_triton_bwd.py``, the AOT spec list of every
attention kernel in ``_attention_triton_aot.py`` (see docs/attention.md for the contract).

Forward: one program per (query block, batch*head[, key split]); online softmax in fp32 in the
log2 domain (exp2); GQA by index; causal key blocks beyond the diagonal are not visited. Decode
shapes (few query rows, many keys) split the key axis over programs that write fp32 partial
(out, lse), merged by ``attn_combine_kernel``. Backward: D = rowsum(dO * O); one program per key
block accumulates dK/dV over the query blocks of every query head of its kv group (no atomics);
dQ by a per-query-block kernel (deterministic) or fp32 atomics from the dK/dV kernel.
Under the interpreter every load is upcast to fp32 (``UPCAST``); on a GPU fp16/bf16 tiles go to
``tl.dot`` as they are (tensor cores), fp32 ones with ``input_precision="tf32x3"`` (three TF32
products: tensor cores at about fp32 accuracy).

Grids: the (query or key) blocks and the batch*heads share grid axis 0, blocks fastest (program
``pid`` is block ``pid % n_blocks`` of head ``pid // n_blocks``), so that batch*heads past 65,535
launch (CUDA allows 2**31 - 1 programs on axis 0, 65,535 on the others). Offsets: every product of
an index and a stride is taken in int64 (tensors past 2**31 elements, any layout).
"""

from __future__ import annotations

from typing import Any

import torch

from fastattn import reference
from fastattn._triton import (
    Tile,
    checked_grid,
    device_guard,
    interpreting,
    jit,
    launch_tiled,
    needs_bf16_rounding,
    round_to_bf16,
    tl,
    triton,
)
from fastattn._triton import next_power_of_2 as _p2
from fastattn.ops import opcall

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------- kernels
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
def tile_scores(q, kt, M, m_row, qi, r_ok, cols, Sk, causal_offset, qk_scale, s_mn,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                PREC: tl.constexpr):
    """Scores of a (BLOCK_M, BLOCK_N) tile in log2 units; -inf where masked or out of bounds.
    Row r is query ``qi[r]`` and its mask row starts at element ``m_row[r]`` (int64)."""
    s = tl.dot(q, kt, input_precision=PREC) * qk_scale
    valid = r_ok[:, None] & (cols < Sk)[None, :]
    if HAS_MASK:
        mp = M + m_row[:, None] + cols.to(tl.int64)[None, :] * s_mn
        if MASK_BOOL:
            valid = valid & (tl.load(mp, mask=valid, other=0).to(tl.int32) != 0)
        else:
            s += tl.load(mp, mask=valid, other=0.0).to(tl.float32) * 1.4426950408889634
    if CAUSAL:
        valid = valid & (cols[None, :] <= qi[:, None] + causal_offset)
    return tl.where(valid, s, float("-inf"))


@jit
def attn_fwd_kernel(Q, K, V, Out, LSE, M, RNG, qk_scale, drop_scale, drop_thr,
                    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb, s_mh, s_mm, s_mn,
                    H, GROUP, NH, Sq, Sk, D, causal_offset, keys_per_split, s_os, s_ls, seq_class,
                    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    RNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # Program pid_h * n_m + pid_m (axis 0), split (axis 2) owns rows r of NH query heads h0 ..
    # h0+NH-1 (NH = GROUP packs a kv group's heads into one tile for decode, else 1): head
    # h0 + r // Sq, query r % Sq.
    n_m = tl.cdiv(NH * Sq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_h = tl.program_id(0) // n_m
    split = tl.program_id(2)
    b = (pid_h // (H // NH)).to(tl.int64)
    h0 = (pid_h % (H // NH)) * NH
    hk = (h0 // GROUP).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hr = (h0 + rows // Sq).to(tl.int64)
    qi = rows % Sq
    r_ok = rows < NH * Sq
    grow = (b * H + h0) * Sq + rows  # global row (b*H + h)*Sq + i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * s_qb + hr[:, None] * s_qh + qi.to(tl.int64)[:, None] * s_qm
                + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kp = K + b * s_kb + hk * s_kh + offs_d[:, None]
    vp = V + b * s_vb + hk * s_vh + offs_d[None, :]
    m_row = b * s_mb + hr * s_mh + qi.to(tl.int64) * s_mm
    lo = split * keys_per_split
    hi = tl.minimum(Sk, lo + keys_per_split)
    if CAUSAL:  # key blocks past the diagonal of the block's last query are never visited
        last = tl.minimum((pid_m + 1) * BLOCK_M, NH * Sq) - 1
        max_i = tl.where(pid_m * BLOCK_M // Sq == last // Sq, last % Sq, Sq - 1)
        hi = tl.minimum(hi, max_i + 1 + causal_offset)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < Sk
        kt = tl.load(kp + cols.to(tl.int64)[None, :] * s_kn, mask=d_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tile_scores(q, kt, M, m_row, qi, r_ok, cols, Sk, causal_offset, qk_scale, s_mn,
                        HAS_MASK, MASK_BOOL, CAUSAL, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(RNG, grow, cols, drop_thr, False), p, 0.0)
        v = tl.load(vp + cols.to(tl.int64)[:, None] * s_vn, mask=c_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    dead = l_i == 0.0  # no visible key (in this split): out 0, lse -inf
    out = acc * (drop_scale / tl.where(dead, 1.0, l_i))[:, None]
    lse = (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453
    lse = tl.where(dead, float("-inf"), lse)
    if RNE_BF16:
        out = round_to_bf16(out)
    tl.store(Out + split.to(tl.int64) * s_os + grow[:, None] * D + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LSE + split.to(tl.int64) * s_ls + grow, lse, mask=r_ok)


@jit
def attn_combine_kernel(OP, LP, Out, LSE, n_splits, s_os, s_ls, D,
                        SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, RNE_BF16: tl.constexpr):
    """Merges the fp32 partial (out, lse) of the key splits of one query row."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LP + sp.to(tl.int64) * s_ls + row, mask=sp < n_splits, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    m_ref = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(lse_s - m_ref), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    lp = LP + row
    op = OP + row * D + offs_d
    for _ in range(0, n_splits):  # pointers step by one split (64-bit pointer arithmetic)
        acc += tl.exp(tl.load(lp) - m_ref) * tl.load(op, mask=offs_d < D, other=0.0)
        lp += s_ls
        op += s_os
    out = acc / tl.where(total == 0.0, 1.0, total)
    if RNE_BF16:
        out = round_to_bf16(out)
    tl.store(Out + row * D + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
    lse = m_ref + tl.log(tl.where(total == 0.0, 1.0, total))
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), lse))
# fmt: on


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


def fwd_configs(dtype: torch.dtype, tier: int) -> list[Tile]:
    return (FWD_CONFIGS_FP32 if dtype == torch.float32 else FWD_CONFIGS)[tier]


def dkdv_configs(dtype: torch.dtype, tier: int) -> list[Tile]:
    return (DKDV_CONFIGS_FP32 if dtype == torch.float32 else DKDV_CONFIGS)[tier]


def dq_configs(dtype: torch.dtype, tier: int) -> list[Tile]:
    return (DQ_CONFIGS_FP32 if dtype == torch.float32 else DQ_CONFIGS)[tier]


def split_config(dtype: torch.dtype, tier: int) -> Tile:
    return (SPLIT_CONFIG_FP32 if dtype == torch.float32 else SPLIT_CONFIG)[tier]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 tiles as three TF32 products (near-fp32 accuracy on tensor
    cores); fp16/bf16 tiles ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def head_tier(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def head_block(d: int) -> int:
    return max(16, _p2(d))


# Autotune keys: the feature flags, then seq_class: the sequence lengths by powers of two, so
# that one shape does not pick the tile of every other (exact lengths would re-tune at every
# new length). Triton adds the dtypes of the tensor arguments.
TUNE_KEYS = ["BLOCK_D", "CAUSAL", "HAS_MASK", "DROPOUT", "MASK_GRAD", "ATOMIC_DQ", "seq_class"]


def seq_class(sq: int, sk: int) -> int:
    """The autotune bucket of (seqlen_q, seqlen_k): their ceil(log2), packed in one int (an
    argument the kernels take and ignore, for the autotune key)."""
    return (max(sq, 1) - 1).bit_length() * 64 + (max(sk, 1) - 1).bit_length()


def blocks_grid(n_rows: int, heads: int, block: str = "BLOCK_M", splits: int = 1) -> Any:
    """Grid (of a tile ``meta``) of a kernel with one program per block of ``meta[block]`` of
    the ``n_rows`` rows of each of ``heads`` heads, on axis 0 (the blocks of a head fastest, as
    the kernels decode it), and ``splits`` key splits on axis 2."""
    return lambda meta: (triton.cdiv(n_rows, meta[block]) * heads, 1, splits)


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return opcall.new_output(torch.empty(shape, dtype=dtype, device=device))


def mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, list[int], dict]:
    if mask is None:
        return q, [0, 0, 0, 0], {"HAS_MASK": False, "MASK_BOOL": False}
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    flags = {"HAS_MASK": True, "MASK_BOOL": mask.dtype == torch.bool}
    return m, list(m.stride()), flags


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


# --------------------------------------------------------------------------------- launchers
def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    rng: torch.Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    dropout_p: float,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention; ``num_splits`` forces the key splits (tests)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = opcall.new_output(q)
    lse = _new((B, H, Sq), torch.float32, q.device)
    if B * H * Sq == 0 or Sk == 0 or D == 0:  # no launch; the oracle on empty data is free
        ref_out, ref_lse = reference.attention(q, k, v, mask, scale, causal, causal_offset,
                                               dropout_p, rng)  # fmt: skip
        out.copy_(ref_out)
        lse.copy_(ref_lse)
        return out, lse
    block_d = head_block(D)
    tier = head_tier(block_d)
    m_arg, m_strides, flags = mask_args(mask, q)
    r_arg, drop_scale, thr, dropout = dropout_args(dropout_p, rng, q)
    flags.update(CAUSAL=causal, DROPOUT=dropout, UPCAST=interpreting(),
                 PREC=dot_precision(q.dtype), BLOCK_D=block_d)  # fmt: skip
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides]
    split_m, split_n, split_w, split_s = split_config(q.dtype, tier)
    group = H // Hkv
    m_tiles = triton.cdiv(group * Sq, split_m)  # split-K packs the heads of a kv group
    splits = num_splits
    if splits is None:
        splits = decode_splits(q, B * Hkv * m_tiles, Sk, split_n) if Sq <= SPLIT_MAX_SQ else 1
    splits = max(1, min(splits, MAX_SPLITS, -(-Sk // split_n)))
    with device_guard(q):
        if splits == 1:
            args = (q, k, v, out, lse, m_arg, r_arg, scale * LOG2E, drop_scale, thr, *strides,
                    H, group, 1, Sq, Sk, D, causal_offset, Sk, 0, 0, seq_class(Sq, Sk))  # fmt: skip
            flags["RNE_BF16"] = needs_bf16_rounding(out)
            launch_tiled(attn_fwd_kernel, fwd_configs(q.dtype, tier), blocks_grid(Sq, B * H),
                         args, flags, keys=TUNE_KEYS)  # fmt: skip
            return out, lse
        per = -(-Sk // (splits * split_n)) * split_n  # keys per split, whole blocks
        splits = -(-Sk // per)
        o_part = torch.empty((splits, B * H, Sq, D), dtype=torch.float32, device=q.device)
        l_part = torch.empty((splits, B * H, Sq), dtype=torch.float32, device=q.device)
        grid = blocks_grid(group * Sq, B * Hkv, splits=splits)({"BLOCK_M": split_m})
        attn_fwd_kernel[checked_grid(grid)](
            q, k, v, o_part, l_part, m_arg, r_arg, scale * LOG2E, drop_scale, thr, *strides,
            H, group, group, Sq, Sk, D, causal_offset, per, B * H * Sq * D, B * H * Sq,
            seq_class(Sq, Sk), **flags,
            RNE_BF16=False, BLOCK_M=split_m, BLOCK_N=split_n, num_warps=split_w,
            num_stages=split_s,
        )  # fmt: skip
        attn_combine_kernel[checked_grid((B * H * Sq,))](
            o_part, l_part, out, lse, splits, B * H * Sq * D, B * H * Sq, D,
            SPLITS=MAX_SPLITS, BLOCK_D=block_d, RNE_BF16=needs_bf16_rounding(out), num_warps=4,
        )  # fmt: skip
    return out, lse
