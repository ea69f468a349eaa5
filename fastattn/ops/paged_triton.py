"""Triton kernel of attention against a paged KV cache (``fastattn.paged_attention``, issue 16):
one launch for the whole batch that walks each sequence's block table itself (no gather of its
keys into a dense run), plus one combine launch when the keys are split.

Grid: axis 0 holds the query tiles of one (sequence, kv head), tiles fastest, times
batch * kv_heads (the axis allowed past 65,535 programs); axis 2 the key splits. A program holds
the rows of all GROUP query heads of its kv head (row r: head ``hk * GROUP + r // Sq``, query
``r % Sq``), so each K/V tile is loaded once per kv group. Key position t of sequence b is row
``t % block_size`` of cache block ``block_table[b, t // block_size]``; the block id is looked
up per key column of a tile, so a tile may span several cache blocks (block_size < BLOCK_N) and
a block several tiles (block_size > BLOCK_N) with one code path. The key count ``seqlens_k[b]``
is read in the kernel; the host only sizes the grid from the block table's shape (an upper
bound), so no host integer derived from tensor values is needed. Online softmax in fp32 in the
log2 domain; the score tile (softcap, ALiBi, causal and window limits, bottom-right aligned per
sequence) is ``tile_scores`` of the dense kernels. Offsets are int64 products (caches past
2**31 elements). Under the interpreter every load is upcast to fp32 (``UPCAST``).
"""

from __future__ import annotations

from typing import Any

import torch

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
from fastattn.ops._attention_triton_common import (
    LOG2E,
    MAX_SPLITS,
    SPLIT_MAX_SQ,
    decode_splits,
    dot_precision,
    head_block,
    kv_tier,
    new_tensor,
    seq_class,
    tile_scores,
    variant_args,
)

__all__ = [
    "DECODE_TILES",
    "FP32_TILES",
    "PREFILL_TILES",
    "TUNE_KEYS",
    "aot_specs",
    "paged_combine_kernel",
    "paged_forward",
    "paged_fwd_kernel",
    "paged_tiles",
]


# fmt: off
@jit
def paged_fwd_kernel(
    Q, KC, VC, BT, SL, Out, LSE, Sinks, Alibi,
    s_ab, s_ah, cap2, win_left, win_right, qk_scale,
    s_qb, s_qm, s_qh, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_tb, s_ob, s_om, s_oh,
    H, GROUP, Sq, D, Dv, page_shift, max_keys, keys_per_split, s_os, s_ls, seq_class,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    SINKS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, OWN_DV: tl.constexpr,
):
    # q (B, Sq, H, D); caches (blocks, block_size, Hkv, D | Dv), rows strided s_kt / s_vt;
    # Out (B, Sq, H, Dv) and LSE (B, H, Sq), or with splits the fp32 partials of split
    # ``program_id(2)`` at s_os / s_ls. seq_class: the autotune key's length bucket (unused).
    n_m = tl.cdiv(GROUP * Sq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_h = tl.program_id(0) // n_m  # b * Hkv + hk
    split = tl.program_id(2)
    b = (pid_h // (H // GROUP)).to(tl.int64)
    hk = (pid_h % (H // GROUP)).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < GROUP * Sq
    hr = hk * GROUP + rows // Sq  # each row's query head (int64)
    qi = rows % Sq
    # Keys of this sequence (clamped to what its table row can name: a memory guard, the op
    # refuses longer ones); queries are its last Sq positions (bottom-right alignment).
    nk = tl.minimum(tl.load(SL + b), max_keys)
    offset = nk - Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if OWN_DV:
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < Dv
    else:
        offs_dv = offs_d
        dv_ok = d_ok
        Dv = D
    q = tl.load(Q + b * s_qb + qi.to(tl.int64)[:, None] * s_qm + hr[:, None] * s_qh
                + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kp = KC + hk * s_kh + offs_d[:, None]
    vp = VC + hk * s_vh + offs_dv[None, :]
    bt = BT + b * s_tb
    lo = split * keys_per_split
    hi = tl.minimum(nk, lo + keys_per_split)
    last = tl.minimum((pid_m + 1) * BLOCK_M, GROUP * Sq) - 1
    one_head = pid_m * BLOCK_M // Sq == last // Sq  # the tile's rows are of one head
    max_i = tl.where(one_head, last % Sq, Sq - 1)
    if CAUSAL:  # no key tile past the diagonal of the tile's last query
        hi = tl.minimum(hi, max_i + 1 + offset)
    if WINDOW:  # nor outside every row's window (whole tiles from the split's start)
        if win_left >= 0:
            min_i = tl.where(one_head, (pid_m * BLOCK_M) % Sq, 0)
            first = tl.maximum(lo, min_i + offset - win_left)
            lo = lo + (first - lo) // BLOCK_N * BLOCK_N
        if win_right >= 0:
            hi = tl.minimum(hi, max_i + offset + win_right + 1)
    slope2 = 0.0
    if ALIBI:  # per row (its head): slope * log2(e)
        slope2 = tl.load(Alibi + b * s_ab + hr * s_ah, mask=r_ok, other=0.0) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < nk
        page = cols >> page_shift  # the column's entry in the block table
        blk = tl.load(bt + page, mask=c_ok, other=0).to(tl.int64)
        tok = (cols - (page << page_shift)).to(tl.int64)  # its row in that block
        kt = tl.load(kp + (blk * s_kp + tok * s_kt)[None, :], mask=d_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s, _ = tile_scores(q, kt, Q, 0, qi, r_ok, cols, nk, offset, qk_scale, 0, slope2, cap2,
                           win_left, win_right, False, False, CAUSAL, PREC, SOFTCAP, ALIBI,
                           WINDOW)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vp + (blk * s_vp + tok * s_vt)[:, None], mask=c_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    dead = l_i == 0.0  # no visible key (in this split): out 0, lse -inf
    if SINKS:  # the head's sink joins the denominator (log2 units), with no value
        sk2 = tl.load(Sinks + hr, mask=r_ok, other=float("-inf")) * 1.4426950408889634
        m2 = tl.maximum(m_i, sk2)
        m2 = tl.where(m_i != m_i, m_i, m2)  # (a NaN row stays NaN)
        m2r = tl.where(m2 == float("-inf"), 0.0, m2)
        l_i = l_i * tl.exp2(m_i - m2r) + tl.exp2(sk2 - m2r)
        acc = acc * tl.exp2(m_i - m2r)[:, None]
        m_i = m2
        dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453
    lse = tl.where(dead, float("-inf"), lse)
    if RNE_BF16:
        out = round_to_bf16(out)
    o_row = split.to(tl.int64) * s_os + b * s_ob + qi.to(tl.int64) * s_om + hr * s_oh
    tl.store(Out + o_row[:, None] + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=r_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + split.to(tl.int64) * s_ls + (b * H + hr) * Sq + qi, lse, mask=r_ok)


@jit
def paged_combine_kernel(
    OP, LP, Out, LSE, Sinks, n_splits, s_os, s_ls, H, Sq, Dv,
    SPLITS: tl.constexpr, SINKS_ON: tl.constexpr, BLOCK_DV: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """Merges the fp32 partial (out, lse) of the key splits of one query row (program
    (b * H + h) * Sq + i, the lse order) and its head's sink, which joins the denominator once,
    with no value. Out and the partials are contiguous (B, Sq, H, Dv)."""
    row = tl.program_id(0).to(tl.int64)
    i = row % Sq
    h = (row // Sq) % H
    o_row = ((row // (H * Sq) * Sq + i) * H + h) * Dv
    sp = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LP + sp.to(tl.int64) * s_ls + row, mask=sp < n_splits, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    sink = float("-inf")
    if SINKS_ON:
        sink = tl.load(Sinks + h)
        mx = tl.maximum(mx, sink)
    m_ref = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(lse_s - m_ref), 0)
    if SINKS_ON:
        total += tl.exp(sink - m_ref)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    lp = LP + row
    op = OP + o_row + offs_d
    for _ in range(0, n_splits):  # pointers step by one split (64-bit pointer arithmetic)
        acc += tl.exp(tl.load(lp) - m_ref) * tl.load(op, mask=offs_d < Dv, other=0.0)
        lp += s_ls
        op += s_os
    out = acc / tl.where(total == 0.0, 1.0, total)
    if RNE_BF16:
        out = round_to_bf16(out)
    tl.store(Out + o_row + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < Dv)
    lse = m_ref + tl.log(tl.where(total == 0.0, 1.0, total))
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), lse))


# fmt: on
# ------------------------------------------------------------------------- configurations
# (BLOCK_M, BLOCK_N, warps, stages) lists per head-dim tier (kv_tier), autotuned on a GPU among
# the tiles whose compiled kernel fits (launch_tiled); the first is the pinned one. Decode: a kv
# group's rows of one or a few queries fit 16 rows (a 64-row tile would be mostly padding; the
# loop is memory-bound). Prefill chunks (more rows): the dense forward's first tiles. Each list
# ends with a tile that spills no register unaligned either (16 x 16, 8 warps: pointers or
# strides not multiples of 16 leave no vector loads), measured by tests/test_triton_aot.py with
# every variant on; at tier 256 the 16 x 32 decode tile spills 8 B aligned on sm_90 (v 128).
# fp32 (rare; tf32x3 dots): the dense split-K fp32 tiles; tier 256 spills unaligned at every
# 16 x 16 tile (known; 8 warps spill aligned too, so the list holds the one that does not).
DECODE_TILES: dict[int, list[Tile]] = {
    64: [(16, 64, 4, 2), (16, 16, 8, 1)],
    128: [(16, 32, 4, 2), (16, 16, 8, 1)],
    256: [(16, 16, 8, 1)],
}  # fmt: skip
PREFILL_TILES: dict[int, list[Tile]] = {64: [(64, 64, 4, 2), (16, 16, 8, 1)],
                                        128: [(64, 32, 8, 2), (16, 16, 8, 1)],
                                        256: [(64, 16, 8, 2), (16, 16, 8, 1)]}  # fmt: skip
FP32_TILES: dict[int, list[Tile]] = {64: [(16, 32, 4, 2)], 128: [(16, 16, 4, 2), (16, 16, 8, 1)],
                                     256: [(16, 16, 4, 2)]}  # fmt: skip
TUNE_KEYS = ["BLOCK_D", "BLOCK_DV", "OWN_DV", "CAUSAL", "SOFTCAP", "ALIBI", "WINDOW", "SINKS",
             "seq_class"]  # fmt: skip


def paged_tiles(dtype: torch.dtype, tier: int, rows: int) -> list[Tile]:
    """The tiles of a launch whose programs hold ``rows`` = group * seqlen_q query rows."""
    if dtype == torch.float32:
        return FP32_TILES[tier]
    return (DECODE_TILES if rows <= 16 else PREFILL_TILES)[tier]


# --------------------------------------------------------------------------------- launcher
def paged_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqlens_k: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``(batch, seqlen_q, heads, head_dim_v)``, lse ``(batch, heads, seqlen_q)`` fp32) of
    q ``(batch, seqlen_q, heads, head_dim)`` against the caches ``(num_blocks, block_size,
    kv_heads, head_dim | head_dim_v)``: sequence b attends to its ``seqlens_k[b]`` keys (int32,
    at most ``max_blocks * block_size``; 0 gives out 0 and lse -inf, or its sink), named by
    int32 ``block_table`` ``(batch, max_blocks)``; the queries are its last positions. Sinks
    ``(heads,)`` and ALiBi slopes ``(batch, heads)`` are float32. ``num_splits`` and ``tile``
    force the key splits and the tile (tests). The kernel needs no host value: it reads the lengths.
    """
    B, Sq, H, D = q.shape
    bs, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = new_tensor((B, Sq, H, Dv), q.dtype, q.device)
    lse = new_tensor((B, H, Sq), torch.float32, q.device)
    max_keys = block_table.shape[1] * bs  # the host's upper bound on any sequence's keys
    block_table = block_table.contiguous()  # the kernel steps along a row by 1
    if B * Sq * H == 0:
        return out, lse
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_d, block_dv = head_block(D), head_block(Dv)
    tier, group = kv_tier(block_d, block_dv), H // Hkv
    tiles = [tile] if tile else paged_tiles(q.dtype, tier, group * Sq)
    n = max(t[1] for t in tiles)  # splits hold whole key tiles of every tile of the list
    var_args, var_flags = variant_args(q, window_left, window_right, softcap, sinks, alibi)
    flags = dict(CAUSAL=causal, UPCAST=interpreting(), PREC=dot_precision(q.dtype),
                 BLOCK_D=block_d, BLOCK_DV=block_dv, OWN_DV=Dv != D, **var_flags)  # fmt: skip
    # Split the keys only for decode-like calls too few to fill the GPU (decode_splits: twice
    # the SMs in programs, >= 2 key tiles each), sized by the longest context the table allows.
    splits = num_splits
    if splits is None and Sq <= SPLIT_MAX_SQ:
        splits = decode_splits(q, B * Hkv * triton.cdiv(group * Sq, tiles[0][0]), max_keys, n)
    splits = max(1, min(splits or 1, MAX_SPLITS, triton.cdiv(max_keys, n)))
    per = triton.cdiv(max(max_keys, 1), splits * n) * n  # keys per split, whole tiles
    splits = triton.cdiv(max(max_keys, 1), per)
    strides = [q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3],
               *v_cache.stride()[:3], block_table.stride(0)]  # fmt: skip
    shift = bs.bit_length() - 1  # block_size is a power of two
    dims = [H, group, Sq, D, Dv, shift, max_keys, per]
    head = (q, k_cache, v_cache, block_table, seqlens_k)
    grid = lambda meta: (triton.cdiv(group * Sq, meta["BLOCK_M"]) * B * Hkv, 1, splits)  # noqa: E731
    bucket = seq_class(group * Sq, max_keys)
    with device_guard(q):
        if splits == 1:
            args = (*head, out, lse, *var_args, scale * LOG2E, *strides, *out.stride()[:3], *dims,
                    0, 0, bucket)  # fmt: skip
            kw = {**flags, "RNE_BF16": needs_bf16_rounding(out)}
            launch_tiled(paged_fwd_kernel, tiles, grid, args, kw, keys=TUNE_KEYS)
            return out, lse
        o_part = torch.empty((splits, B, Sq, H, Dv), dtype=torch.float32, device=q.device)
        l_part = torch.empty((splits, B, H, Sq), dtype=torch.float32, device=q.device)
        args = (*head, o_part, l_part, *var_args, scale * LOG2E, *strides, *o_part.stride()[1:4],
                *dims, o_part.stride(0), l_part.stride(0), bucket)  # fmt: skip
        # The sinks join once, in the combine, not in each split's partial.
        launch_tiled(paged_fwd_kernel, tiles, grid, args,
                     {**flags, "SINKS": False, "RNE_BF16": False}, keys=TUNE_KEYS)  # fmt: skip
        paged_combine_kernel[checked_grid((B * H * Sq,))](
            o_part, l_part, out, lse, var_args[0], splits, o_part.stride(0), l_part.stride(0),
            H, Sq, Dv, SPLITS=MAX_SPLITS, SINKS_ON=sinks is not None, BLOCK_DV=block_dv,
            RNE_BF16=needs_bf16_rounding(out), num_warps=4,
        )  # fmt: skip
    return out, lse


# ------------------------------------------------------------------------------ AOT specs
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOATS = {"cap2", "qk_scale"}


def _signature(kernel: Any, ptrs: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    return {a: ptrs.get(a) or ("fp32" if a in _FLOATS else "i32") for a in kernel.arg_names
            if a not in constexprs}  # fmt: skip


def aot_specs() -> Any:
    """Every tile of the paged kernel (decode and prefill, fp16; fp32) per head-dim tier, with
    every variant on (causal, window, softcap, ALiBi, sinks: the most registers; bf16 compiles
    as fp16: the same registers), for v's head dim equal and of its own (192 / 128: tier 256);
    the split-K partial kernel (fp32 out, no sinks) of each; the combine per dtype and tier."""
    dims = [(64, 64), (128, 128), (256, 256), (256, 128)]
    for block_d, block_dv in dims:
        tier = kv_tier(block_d, block_dv)
        name = f"{tier}" + ("" if block_d == block_dv else f"-d{block_d}v{block_dv}")
        lists = [("fp16-decode", DECODE_TILES[tier]), ("fp16-prefill", PREFILL_TILES[tier]),
                 ("fp32", FP32_TILES[tier])]  # fmt: skip
        for label, (m, n, w, s) in ((lb, c) for lb, cs in lists for c in cs):
            t = label[:4]
            dtype = torch.float32 if t == "fp32" else torch.float16
            cx = {"CAUSAL": True, "SOFTCAP": True, "ALIBI": True, "WINDOW": True, "SINKS": True,
                  "UPCAST": False, "PREC": dot_precision(dtype), "RNE_BF16": False,
                  "BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "BLOCK_DV": block_dv,
                  "OWN_DV": block_d != block_dv}  # fmt: skip
            io = {"Q": f"*{t}", "KC": f"*{t}", "VC": f"*{t}", "BT": "*i32", "SL": "*i32",
                  "Out": f"*{t}", "LSE": "*fp32", "Sinks": "*fp32", "Alibi": "*fp32"}  # fmt: skip
            for kind, ptrs, flags in (("paged_fwd", io, cx),
                                      ("paged_fwd_split", {**io, "Out": "*fp32"},
                                       {**cx, "SINKS": False})):  # fmt: skip
                yield {
                    "id": f"{kind}-{name}-{label}-m{m}n{n}w{w}s{s}",
                    "kernel": paged_fwd_kernel,
                    "signature": _signature(paged_fwd_kernel, ptrs, flags),
                    "constexprs": flags,
                    "num_warps": w,
                    "num_stages": s,
                }
    for block_dv in (64, 128, 256):
        for t in _TYPES.values():
            cxc = {"SPLITS": MAX_SPLITS, "SINKS_ON": True, "BLOCK_DV": block_dv,
                   "RNE_BF16": False}  # fmt: skip
            ptrs = {"OP": "*fp32", "LP": "*fp32", "Out": f"*{t}", "LSE": "*fp32",
                    "Sinks": "*fp32"}  # fmt: skip
            yield {
                "id": f"paged_combine-d{block_dv}-{t}",
                "kernel": paged_combine_kernel,
                "signature": _signature(paged_combine_kernel, ptrs, cxc),
                "constexprs": cxc,
                "num_warps": 4,
            }
