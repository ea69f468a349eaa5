"""Triton backward kernels of exact attention and their launcher ``triton_backward``. The
algorithm, grids and offset rules are described in ``_attention_triton.py``; the tile helpers,
configurations and launch helpers these use are in ``_attention_triton_common.py``; the contract
is docs/attention.md."""

from __future__ import annotations

import torch

from fastattn._triton import (
    checked_grid,
    device_guard,
    interpreting,
    jit,
    launch_tiled,
    needs_bf16_rounding,
    round_to_bf16,
    tl,
)
from fastattn.ops import opcall
from fastattn.ops._attention_triton_common import (
    LOG2E,
    TUNE_KEYS,
    blocks_grid,
    dkdv_configs,
    dot_precision,
    dq_configs,
    dropout_args,
    dropout_keep,
    head_block,
    kv_tier,
    mask_args,
    seq_class,
    tanh,
    tile_scores,
    variant_args,
    window_visible,
)


# ----------------------------------------------------------------------------------- kernels
# fmt: off
@jit
def attn_bwd_pre_kernel(Out, DO, DELTA, s_db, s_dh, s_dm, H, Sq, Dv,
                        BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """DELTA = rowsum(dO * O) in fp32 (rows of v's head dim Dv)."""
    n_m = tl.cdiv(Sq, BLOCK_M)
    bh = tl.program_id(0) // n_m
    rows = (tl.program_id(0) % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (rows < Sq)[:, None] & (offs_d < Dv)[None, :]
    op = Out + (bh.to(tl.int64) * Sq + rows)[:, None] * Dv + offs_d[None, :]
    o = tl.load(op, mask=ok, other=0.0)
    dop = DO + (bh // H).to(tl.int64) * s_db + (bh % H).to(tl.int64) * s_dh
    do = tl.load(dop + rows.to(tl.int64)[:, None] * s_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Sq + rows, delta, mask=rows < Sq)


@jit
def _bwd_tile(q, do, kt, vt, lse, delta, M, mb, RNG, bh, rows, cols, Sq, Sk, causal_offset,
              qk_scale, drop_scale, drop_thr, s_mm, s_mn, slope2, cap2, win_left, win_right,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
              DROPOUT: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, WINDOW: tl.constexpr):
    """(P dropped and scaled, dS of the raw scores) of one (BLOCK_M, BLOCK_N) tile; kt is
    (BLOCK_D, BLOCK_N), vt (BLOCK_DV, BLOCK_N); the mask rows of this head start at element
    ``mb`` (int64)."""
    s, th = tile_scores(q, kt, M, mb + rows.to(tl.int64) * s_mm, rows, rows < Sq, cols, Sk,
                        causal_offset, qk_scale, s_mn, slope2, cap2, win_left, win_right,
                        HAS_MASK, MASK_BOOL, CAUSAL, PREC, SOFTCAP, ALIBI, WINDOW)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # dead row: s is -inf
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vt, input_precision=PREC)
    if DROPOUT:
        keep = dropout_keep(RNG, bh.to(tl.int64) * Sq + rows, cols, drop_thr, False)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # d(c tanh(x / c)) / dx = 1 - tanh^2
        ds = ds * (1.0 - th * th)
    return pd, ds


@jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DM, M, RNG, Sinks, Alibi, s_ab,
                         s_ah, cap2, win_left, win_right, scale, qk_scale,
                         drop_scale, drop_thr, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh,
                         s_vn, s_db, s_dh, s_dm, s_mb, s_mh, s_mm, s_mn, H, GROUP, Sq, Sk, D,
                         Dv, causal_offset, seq_class,
                         HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                         DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
                         SINKS: tl.constexpr,
                         UPCAST: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, OWN_DV: tl.constexpr):
    """dK, dV of one block of BLOCK_N keys (held: K (BLOCK_N, BLOCK_D), V (BLOCK_N, BLOCK_DV))
    over the query blocks of its kv group, in the transposed form S^T = K Q^T: every tile is (keys,
    queries), so P^T and dS^T feed dV += P^T dO and dK += dS^T Q without a transpose of a
    computed tile (fewer registers and shared memory than S = Q K^T would need)."""
    n_n = tl.cdiv(Sk, BLOCK_N)
    pid_n = tl.program_id(0) % n_n
    bhk = tl.program_id(0) // n_n
    Hkv = H // GROUP
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < Sk
    c64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if OWN_DV:  # v's own head dim: its own offsets and masks
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < Dv
    else:  # one set (Dv = D): the registers of a kernel without a head dim of v's own
        offs_dv = offs_d
        dv_ok = d_ok
        Dv = D
    k_ok = c_ok[:, None] & d_ok[None, :]
    v_ok = c_ok[:, None] & dv_ok[None, :]
    k = tl.load(K + b * s_kb + hk * s_kh + c64[:, None] * s_kn + offs_d[None, :], mask=k_ok,
                other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + c64[:, None] * s_vn + offs_dv[None, :], mask=v_ok,
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    hi = Sq
    if CAUSAL:  # query blocks whose rows see none of these keys are skipped
        lo = (tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M) * BLOCK_M
    if WINDOW:  # and the rows whose window holds none of them
        if win_right >= 0:
            lo = tl.maximum(lo, (pid_n * BLOCK_N - causal_offset - win_right) // BLOCK_M * BLOCK_M)
        if win_left >= 0:
            hi = tl.minimum(hi, pid_n * BLOCK_N + BLOCK_N - causal_offset + win_left)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Alibi + b * s_ab + h * s_ah) * 1.4426950408889634
        qp = Q + b * s_qb + h * s_qh + offs_d[:, None]
        dop = DO + b * s_db + h * s_dh + offs_dv[None, :]
        mp = M + b * s_mb + h * s_mh + c64[:, None] * s_mn
        for start in range(lo, hi, BLOCK_M):
            rows = start + offs_m
            r_ok = rows < Sq
            r64 = rows.to(tl.int64)
            qt = tl.load(qp + r64[None, :] * s_qm, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            do = tl.load(dop + r64[:, None] * s_dm, mask=r_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + bh * Sq + rows, mask=r_ok, other=0.0)
            delta = tl.load(DELTA + bh * Sq + rows, mask=r_ok, other=0.0)
            st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (keys, queries), log2 units
            if SOFTCAP:
                tht = tanh(st / cap2)
                st = tht * cap2
            if ALIBI:
                rel = (rows[None, :] + causal_offset - cols[:, None]).to(tl.float32)
                st -= slope2 * tl.abs(rel)
            inb = c_ok[:, None] & r_ok[None, :]
            valid = inb
            if HAS_MASK:
                mt = mp + r64[None, :] * s_mm
                if MASK_BOOL:
                    valid = valid & (tl.load(mt, mask=inb, other=0).to(tl.int32) != 0)
                else:
                    st += tl.load(mt, mask=inb, other=0.0).to(tl.float32) * 1.4426950408889634
            if CAUSAL:
                valid = valid & (cols[:, None] <= rows[None, :] + causal_offset)
            if WINDOW:
                valid = valid & tl.trans(window_visible(rows, cols, causal_offset, win_left,
                                                        win_right))
            st = tl.where(valid, st, float("-inf"))
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # dead: st -inf
            pt = tl.exp2(st - lse2[None, :])
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            if DROPOUT:
                keep = dropout_keep(RNG, bh * Sq + rows, cols, drop_thr, True)
                pdt = tl.where(keep, pt * drop_scale, 0.0)
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            else:
                pdt = pt
            dst = pt * (dpt - delta[None, :])
            if MASK_GRAD:
                tl.store(DM + (bh * Sq + rows)[None, :] * Sk + cols[:, None], dst, mask=inb)
            if SOFTCAP:  # the raw scores' gradient: d(c tanh(x / c)) / dx = 1 - tanh^2
                dst = dst * (1.0 - tht * tht)
            dv += tl.dot(pdt.to(do.dtype), do, input_precision=PREC)
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PREC)
                tl.atomic_add(DQ + (bh * Sq + rows)[:, None] * D + offs_d[None, :], dq * scale,
                              mask=r_ok[:, None] & d_ok[None, :])
    dk = dk * scale
    if RNE_BF16:
        dk = round_to_bf16(dk)
        dv = round_to_bf16(dv)
    key_row = (bhk.to(tl.int64) * Sk + cols)[:, None]
    tl.store(DK + key_row * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=k_ok)
    tl.store(DV + key_row * Dv + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=v_ok)


@jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, M, RNG, Sinks, Alibi, s_ab, s_ah, cap2,
                       win_left, win_right, scale, qk_scale, drop_scale,
                       drop_thr, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh,
                       s_dm, s_mb, s_mh, s_mm, s_mn, H, GROUP, Sq, Sk, D, Dv, causal_offset,
                       seq_class,
                       HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                       DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                       WINDOW: tl.constexpr, SINKS: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr,
                       RNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, OWN_DV: tl.constexpr):
    """dQ of one block of BLOCK_M query rows (held: q (BLOCK_M, BLOCK_D), dO (BLOCK_M,
    BLOCK_DV)) over the key blocks its rows see."""
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh = tl.program_id(0) // n_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
    ok = (rows < Sq)[:, None] & d_ok[None, :]
    r64 = rows.to(tl.int64)
    q = tl.load(Q + b * s_qb + h * s_qh + r64[:, None] * s_qm + offs_d[None, :], mask=ok,
                other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + r64[:, None] * s_dm + offs_dv[None, :],
                 mask=(rows < Sq)[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_off = bh.to(tl.int64) * Sq + rows
    lse = tl.load(LSE + row_off, mask=rows < Sq, other=0.0)
    delta = tl.load(DELTA + row_off, mask=rows < Sq, other=0.0)
    kp = K + b * s_kb + hk * s_kh + offs_d[:, None]
    vp = V + b * s_vb + hk * s_vh + offs_dv[:, None]
    hi = Sk
    lo = 0
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + causal_offset)
    if WINDOW:  # the keys outside every row's window are skipped
        if win_left >= 0:
            lo = tl.maximum(0, pid_m * BLOCK_M + causal_offset - win_left) // BLOCK_N * BLOCK_N
        if win_right >= 0:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + causal_offset + win_right)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Alibi + b * s_ab + h * s_ah) * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        c_ok = (cols < Sk)[None, :]
        c64 = cols.to(tl.int64)
        kt = tl.load(kp + c64[None, :] * s_kn, mask=d_ok[:, None] & c_ok, other=0.0)
        vt = tl.load(vp + c64[None, :] * s_vn, mask=dv_ok[:, None] & c_ok, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        pd, ds = _bwd_tile(q, do, kt, vt, lse, delta, M, b * s_mb + h * s_mh, RNG, bh, rows, cols,
                           Sq, Sk, causal_offset, qk_scale, drop_scale, drop_thr, s_mm, s_mn,
                           slope2 + tl.zeros([BLOCK_M], tl.float32), cap2, win_left, win_right,
                           HAS_MASK, MASK_BOOL, CAUSAL, DROPOUT, PREC, SOFTCAP, ALIBI, WINDOW)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    dq = dq * scale
    if RNE_BF16:
        dq = round_to_bf16(dq)
    tl.store(DQ + row_off[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ok)
# fmt: on


# --------------------------------------------------------------------------------- launcher
def pre_block_m(block_dv: int) -> int:
    """Rows per program of the dO.O preprocess (rows of v's head dim): 64, or 32 past head dim
    64 (64 x 128 spills)."""
    return 64 if block_dv <= 64 else 32


def triton_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    rng: torch.Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    dropout_p: float,
    deterministic: bool,
    mask_grad: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask, dsinks) of exact attention; dmask is dS in fp32, or empty(0);
    dsinks (H,) float32, or empty(0) without sinks."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = opcall.new_output(q), opcall.new_output(k), opcall.new_output(v)
    shape = (B, H, Sq, Sk) if mask_grad else (0,)
    # Zero-filled: entries of skipped (causal) blocks are never written and are 0.
    dmask = torch.zeros(shape, dtype=torch.float32, device=q.device)
    dsinks = torch.zeros(H if sinks is not None else 0, dtype=torch.float32, device=q.device)
    if B * H * Sq * Sk * Dv == 0:  # (D = 0 with Dv > 0 runs: dv = P^T dO, P uniform)
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask, dsinks
    out, lse = out.contiguous(), lse.contiguous()
    block_d, block_dv = head_block(D), head_block(Dv)
    # Tiles of both head dims are held and streamed: the larger one's tier sizes them.
    tier, blocks = kv_tier(block_d, block_dv), (block_d, block_dv)
    m_arg, m_strides, flags = mask_args(mask, q)
    r_arg, drop_scale, thr, dropout = dropout_args(dropout_p, rng, q)
    var_args, var_flags = variant_args(q, window_left, window_right, softcap, sinks, alibi)
    variants = any(var_flags.values())
    flags.update(CAUSAL=causal, DROPOUT=dropout, UPCAST=interpreting(),
                 PREC=dot_precision(q.dtype), BLOCK_D=block_d, BLOCK_DV=block_dv,
                 OWN_DV=Dv != D, **var_flags)  # fmt: skip
    do_strides = list(grad_out.stride()[:3])
    qkv_strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    sizes = (H, H // Hkv, Sq, Sk, D, Dv, causal_offset, seq_class(Sq, Sk))
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    atomic = not deterministic
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dq
    dm_arg = dmask if mask_grad else delta
    with device_guard(q):
        # (the preprocess reads only O and dO: v's head dim sizes its tile)
        pre_m = pre_block_m(block_dv)
        attn_bwd_pre_kernel[checked_grid(blocks_grid(Sq, B * H)({"BLOCK_M": pre_m}))](
            out, grad_out, delta, *do_strides, H, Sq, Dv, BLOCK_M=pre_m, BLOCK_DV=block_dv,
            num_warps=4,
        )  # fmt: skip
        launch_tiled(
            attn_bwd_dkdv_kernel, dkdv_configs(q.dtype, tier, variants, blocks),
            blocks_grid(Sk, B * Hkv, "BLOCK_N"),
            (q, k, v, grad_out, lse, delta, dq_acc, dk, dv, dm_arg, m_arg, r_arg, *var_args,
             scale, scale * LOG2E, drop_scale, thr, *qkv_strides, *do_strides, *m_strides,
             *sizes),
            {**flags, "MASK_GRAD": mask_grad, "ATOMIC_DQ": atomic,
             "RNE_BF16": needs_bf16_rounding(dk)},
            keys=TUNE_KEYS, reset=["DQ"] if atomic else None,
        )  # fmt: skip
        if atomic:
            if dq_acc.dtype == dq.dtype:
                dq = dq_acc
            else:
                dq.copy_(dq_acc)
        else:
            launch_tiled(
                attn_bwd_dq_kernel, dq_configs(q.dtype, tier, variants, blocks),
                blocks_grid(Sq, B * H),
                (q, k, v, grad_out, lse, delta, dq, m_arg, r_arg, *var_args, scale,
                 scale * LOG2E, drop_scale, thr, *qkv_strides, *do_strides, *m_strides, *sizes),
                {**flags, "RNE_BF16": needs_bf16_rounding(dq)}, keys=TUNE_KEYS,
            )  # fmt: skip
    if sinks is not None:  # d sink_h = -sum over (b, i) of p_sink * delta (docs/attention.md)
        p_sink = torch.exp(sinks.view(1, H, 1) - lse).masked_fill(lse == float("-inf"), 0.0)
        dsinks = -(p_sink * delta).sum((0, 2))
    return dq, dk, dv, dmask, dsinks
