"""Triton kernels of exact attention (FlashAttention-2 style): the forward kernels and their
launcher ``triton_forward``; what forward and backward share (tile helpers, tile configurations,
launch arguments) is ``_attention_triton_common.py``, the backward kernels and ``triton_backward``
``_attention_triton_bwd.py``, the AOT spec list of every attention kernel
``_attention_triton_aot.py`` (see docs/attention.md for the contract).

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

import torch

from fastattn import reference
from fastattn._triton import (
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
    TUNE_KEYS,
    blocks_grid,
    decode_splits,
    dot_precision,
    dropout_args,
    dropout_keep,
    fwd_configs,
    head_block,
    kv_tier,
    mask_args,
    new_tensor,
    seq_class,
    split_config,
    tile_scores,
    variant_args,
)


@jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    M,
    RNG,
    Sinks,
    Alibi,
    s_ab,
    s_ah,
    cap2,
    win_left,
    win_right,
    qk_scale,
    drop_scale,
    drop_thr,
    s_qb,
    s_qh,
    s_qm,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    H,
    GROUP,
    NH,
    Sq,
    Sk,
    D,
    Dv,
    causal_offset,
    keys_per_split,
    s_os,
    s_ls,
    seq_class,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    WINDOW: tl.constexpr,
    SINKS: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    OWN_DV: tl.constexpr,
):
    # q and k have head dim D (BLOCK_D), v and out Dv (BLOCK_DV): each padded and masked alone.
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
    if OWN_DV:  # v's own head dim: its own offsets and masks
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < Dv
    else:  # one set (Dv = D): the registers of a kernel without a head dim of v's own
        offs_dv = offs_d
        dv_ok = d_ok
        Dv = D
    q = tl.load(
        Q + b * s_qb + hr[:, None] * s_qh + qi.to(tl.int64)[:, None] * s_qm + offs_d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    kp = K + b * s_kb + hk * s_kh + offs_d[:, None]
    vp = V + b * s_vb + hk * s_vh + offs_dv[None, :]
    m_row = b * s_mb + hr * s_mh + qi.to(tl.int64) * s_mm
    lo = split * keys_per_split
    hi = tl.minimum(Sk, lo + keys_per_split)
    last = tl.minimum((pid_m + 1) * BLOCK_M, NH * Sq) - 1
    one_head = pid_m * BLOCK_M // Sq == last // Sq  # the block's rows are of one head
    if CAUSAL:  # key blocks past the diagonal of the block's last query are never visited
        max_i = tl.where(one_head, last % Sq, Sq - 1)
        hi = tl.minimum(hi, max_i + 1 + causal_offset)
    if WINDOW:  # nor those outside every row's window (work seqlen x window)
        min_i = tl.where(one_head, (pid_m * BLOCK_M) % Sq, 0)
        max_i = tl.where(one_head, last % Sq, Sq - 1)
        if win_left >= 0:  # (in whole blocks from the split's start: no block crosses a split)
            first = tl.maximum(lo, min_i + causal_offset - win_left)
            lo = lo + (first - lo) // BLOCK_N * BLOCK_N
        if win_right >= 0:
            hi = tl.minimum(hi, max_i + causal_offset + win_right + 1)
    slope2 = 0.0
    if ALIBI:  # per row (its head): slope * log2(e)
        slope2 = tl.load(Alibi + b * s_ab + hr * s_ah, mask=r_ok, other=0.0) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < Sk
        kt = tl.load(
            kp + cols.to(tl.int64)[None, :] * s_kn, mask=d_ok[:, None] & c_ok[None, :], other=0.0
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        s, _ = tile_scores(
            q,
            kt,
            M,
            m_row,
            qi,
            r_ok,
            cols,
            Sk,
            causal_offset,
            qk_scale,
            s_mn,
            slope2,
            cap2,
            win_left,
            win_right,
            HAS_MASK,
            MASK_BOOL,
            CAUSAL,
            PREC,
            SOFTCAP,
            ALIBI,
            WINDOW,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(RNG, grow, cols, drop_thr, False), p, 0.0)
        v = tl.load(
            vp + cols.to(tl.int64)[:, None] * s_vn, mask=c_ok[:, None] & dv_ok[None, :], other=0.0
        )
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
        dead = l_i == 0.0  # no key and a -inf sink
    out = acc * (drop_scale / tl.where(dead, 1.0, l_i))[:, None]
    lse = (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453
    lse = tl.where(dead, float("-inf"), lse)
    if RNE_BF16:
        out = round_to_bf16(out)
    tl.store(
        Out + split.to(tl.int64) * s_os + grow[:, None] * Dv + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=r_ok[:, None] & dv_ok[None, :],
    )
    tl.store(LSE + split.to(tl.int64) * s_ls + grow, lse, mask=r_ok)


@jit
def attn_combine_kernel(
    OP,
    LP,
    Out,
    LSE,
    Sinks,
    n_splits,
    s_os,
    s_ls,
    Dv,
    H,
    Sq,
    SPLITS: tl.constexpr,
    SINKS_ON: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """Merges the fp32 partial (out, lse) of the key splits of one query row (and its head's
    sink, which joins the denominator once, with no value); rows of v's head dim Dv."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LP + sp.to(tl.int64) * s_ls + row, mask=sp < n_splits, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    sink = float("-inf")
    if SINKS_ON:
        sink = tl.load(Sinks + (row // Sq) % H)
        mx = tl.maximum(mx, sink)
    m_ref = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(lse_s - m_ref), 0)
    if SINKS_ON:
        total += tl.exp(sink - m_ref)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    lp = LP + row
    op = OP + row * Dv + offs_d
    for _ in range(0, n_splits):  # pointers step by one split (64-bit pointer arithmetic)
        acc += tl.exp(tl.load(lp) - m_ref) * tl.load(op, mask=offs_d < Dv, other=0.0)
        lp += s_ls
        op += s_os
    out = acc / tl.where(total == 0.0, 1.0, total)
    if RNE_BF16:
        out = round_to_bf16(out)
    tl.store(Out + row * Dv + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < Dv)
    lse = m_ref + tl.log(tl.where(total == 0.0, 1.0, total))
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), lse))


# fmt: on


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
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention; ``num_splits`` forces the key splits (tests). Window,
    softcap, sinks (H,) and ALiBi slopes (B, H), both float32: docs/attention.md."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = new_tensor((B, H, Sq, Dv), q.dtype, q.device)
    lse = new_tensor((B, H, Sq), torch.float32, q.device)
    if B * H * Sq * Sk * D * Dv == 0:  # no launch; the oracle on empty data is free
        ref_out, ref_lse = reference.attention(
            q, k, v, mask, scale, causal, causal_offset, dropout_p, rng,
            window=(window_left, window_right), softcap=softcap, sinks=sinks, alibi_slopes=alibi,
        )  # fmt: skip
        out.copy_(ref_out)
        lse.copy_(ref_lse)
        return out, lse
    block_d, block_dv = head_block(D), head_block(Dv)
    # Tiles of both head dims are held and streamed: the larger one's tier sizes them.
    tier, blocks = kv_tier(block_d, block_dv), (block_d, block_dv)
    m_arg, m_strides, flags = mask_args(mask, q)
    r_arg, drop_scale, thr, dropout = dropout_args(dropout_p, rng, q)
    var_args, var_flags = variant_args(q, window_left, window_right, softcap, sinks, alibi)
    flags.update(CAUSAL=causal, DROPOUT=dropout, UPCAST=interpreting(),
                 PREC=dot_precision(q.dtype), BLOCK_D=block_d, BLOCK_DV=block_dv,
                 OWN_DV=Dv != D, **var_flags)  # fmt: skip
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides]
    variants = any(var_flags.values())
    split_m, split_n, split_w, split_s = split_config(q.dtype, tier, variants, blocks)
    group = H // Hkv
    m_tiles = triton.cdiv(group * Sq, split_m)  # split-K packs the heads of a kv group
    splits = num_splits
    if splits is None:
        splits = decode_splits(q, B * Hkv * m_tiles, Sk, split_n) if Sq <= SPLIT_MAX_SQ else 1
    splits = max(1, min(splits, MAX_SPLITS, -(-Sk // split_n)))
    with device_guard(q):
        if splits == 1:
            args = (q, k, v, out, lse, m_arg, r_arg, *var_args, scale * LOG2E, drop_scale, thr,
                    *strides, H, group, 1, Sq, Sk, D, Dv, causal_offset, Sk, 0, 0,
                    seq_class(Sq, Sk))  # fmt: skip
            flags["RNE_BF16"] = needs_bf16_rounding(out)
            launch_tiled(attn_fwd_kernel, fwd_configs(q.dtype, tier, variants, blocks),
                         blocks_grid(Sq, B * H),
                         args, flags, keys=TUNE_KEYS)  # fmt: skip
            return out, lse
        per = -(-Sk // (splits * split_n)) * split_n  # keys per split, whole blocks
        splits = -(-Sk // per)
        o_part = torch.empty((splits, B * H, Sq, Dv), dtype=torch.float32, device=q.device)
        l_part = torch.empty((splits, B * H, Sq), dtype=torch.float32, device=q.device)
        grid = blocks_grid(group * Sq, B * Hkv, splits=splits)({"BLOCK_M": split_m})
        # The sinks join once, in the combine, not in each split's partial.
        attn_fwd_kernel[checked_grid(grid)](
            q, k, v, o_part, l_part, m_arg, r_arg, *var_args, scale * LOG2E, drop_scale, thr,
            *strides, H, group, group, Sq, Sk, D, Dv, causal_offset, per, B * H * Sq * Dv,
            B * H * Sq, seq_class(Sq, Sk), **{**flags, "SINKS": False},
            RNE_BF16=False, BLOCK_M=split_m, BLOCK_N=split_n, num_warps=split_w,
            num_stages=split_s,
        )  # fmt: skip
        attn_combine_kernel[checked_grid((B * H * Sq,))](
            o_part, l_part, out, lse, var_args[0], splits, B * H * Sq * Dv, B * H * Sq, Dv, H, Sq,
            SPLITS=MAX_SPLITS, SINKS_ON=sinks is not None, BLOCK_DV=block_dv,
            RNE_BF16=needs_bf16_rounding(out), num_warps=4,
        )  # fmt: skip
    return out, lse
