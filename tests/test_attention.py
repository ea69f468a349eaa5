"""Fused attention: parity of outputs and every gradient with the float64 oracle, masks, causal
alignment, GQA, dropout, fully masked rows, determinism, memory, bad input, the SDPA drop-in and
compiler integration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU_BACKENDS,
    accepts_as_the_full_checks,
    assert_parity,
    finite_parts_match,
    on_devices,
    refuses_as_the_full_checks,
)

import fastattn
from fastattn import _extension, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (seqlen_q, seqlen_k): one token; decode against 200 keys; odd lengths past one block on both
# axes; one exact block; more keys than a few blocks with ragged ends (255 / 1025 = 1024 + 1);
# more queries than keys (bottom-right causal then hides every key from the first rows).
SEQLENS = [(1, 1), (1, 200), (113, 203), (128, 128), (200, 113), (255, 1025)]
# 16: smallest MMA tile; 40, 96: not powers of two (padded, masked head dims); 256: the maximum.
HEAD_DIMS = [16, 40, 64, 96, 128, 256]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
TRITON_MAX_WORK = 255 * 1025 * 64  # Sq * Sk * D per head; the interpreter runs ~ms per block


def make_qkv(B, H, Hkv, Sq, Sk, D, dtype, device="cpu", layout="bhsd"):
    """Fresh random q, k, v; ``layout="bshd"`` stores them (batch, seqlen, heads, head_dim) and
    returns transposed, non-contiguous views, as HuggingFace models do."""

    def one(h, s):
        if layout == "bshd":
            return torch.randn(B, s, h, D, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, h, s, D, device=device).to(dtype)

    return one(H, Sq), one(Hkv, Sk), one(Hkv, Sk)


def run(impl, q, k, v, grad, mask=None, rng=None, **kw):
    """(out, lse, dq, dk, dv[, dmask]) of one implementation. ``impl``: a backend name, or
    "reference64" (the oracle, fp64) or "eager" (the same math in the inputs' own dtype)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.is_floating_point() and mask.requires_grad:
        m = mask.detach().clone().requires_grad_()
        leaves.append(m)
    causal, p = kw.get("causal", False), kw.get("dropout_p", 0.0)
    scale = kw.get("scale")
    if impl in ("reference64", "eager"):
        dt = torch.float64 if impl == "reference64" else q.dtype
        qs, ks, vs = (t.to(dt) if impl == "reference64" else t for t in leaves[:3])
        mm = (
            m.double() if (impl == "reference64" and m is not None and m.is_floating_point()) else m
        )
        Sq, Sk = q.shape[2], k.shape[2]
        out, lse = reference.attention(qs, ks, vs, mm, scale, causal, Sk - Sq, p, rng, opmath=dt)
    else:
        out, lse = fastattn.attention(*leaves[:3], attn_mask=m, return_lse=True, backend=impl, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [out.detach(), lse.detach().float(), *grads]


def check(backend, q, k, v, mask=None, **kw):
    grad = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    rng = None
    if kw.get("dropout_p", 0.0) > 0:
        torch.manual_seed(1234)  # the op draws its seeds from torch's generator, as here
        rng = torch.randint(0, 2**32, (2,), dtype=torch.int64)
        torch.manual_seed(1234)
    got = run(backend, q, k, v, grad, mask, **kw)
    want = run("reference64", q, k, v, grad, mask, rng, **kw)
    # The same math in q's dtype: the scale of rounding error that eager PyTorch commits.
    base = run("eager", q, k, v, grad, mask, rng, **kw)
    names = ["out", "lse", "dq", "dk", "dv", "dmask"]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        # lse is float32 for every input dtype; judge it by fp32's rule, the rest by q's dtype.
        dt = torch.float32 if names[i] == "lse" and q.dtype != torch.float64 else q.dtype
        e = base[i] if dt == q.dtype else None
        # dq, dk, dS sum dS terms that cancel to ~0 when one key takes all the weight
        # (Sk = 1): their rounding error is at the scale of dv (P-weighted dO), not of theirs.
        terms = want[4].abs().max().item() if names[i] in ("dq", "dk", "dmask") else 0.0
        assert_parity(g, w.double(), e, f"{backend} {names[i]}", dt, ref_scale=terms)


def grid():
    for backend in ("cpu", "triton"):
        for i, (sq, sk) in enumerate(SEQLENS):
            for j, d in enumerate(HEAD_DIMS):
                if backend == "triton" and (d == 256 or sq * sk * d >= TRITON_MAX_WORK // 4):
                    continue  # the interpreter: the largest cases run on the CPU backend only
                h, hkv = HEADS[(i + j) % len(HEADS)]
                for dtype in DTYPES:
                    # fp16 runs bf16's kernel code but for its loads and stores: on the CPU
                    # kernel, a third of the cells (each seqlen, head dim, batch size and head
                    # layout at least twice); the Triton ones in fp16 on a GPU (test_parity_gpu).
                    if dtype == torch.float16 and (backend != "cpu" or (i + 2 * j) % 3 != 0):
                        continue
                    yield backend, dtype, 1 + (i + j) % 2, h, hkv, sq, sk, d


def _dtype_id(v):
    return str(v) if isinstance(v, torch.dtype) else None


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("backend", "dtype", "B", "H", "Hkv", "Sq", "Sk", "D"), list(grid()),
                         ids=_dtype_id)  # fmt: skip
def test_parity_grid(backend, dtype, B, H, Hkv, Sq, Sk, D, causal):
    check(backend, *make_qkv(B, H, Hkv, Sq, Sk, D, dtype), causal=causal)


# fp32 by FlashAttention's rule with a tight atol: max|fast - ref| <= 2 max|eager_fp32 - ref| +
# FP32_ATOL * scale for out and every gradient (scale: max|ref|; for dq and dk at least max|dv|,
# the scale of the dS terms they sum, which cancel to ~0 when one key takes all the weight). The
# parity grid's fp32 bound (conftest: also 1e-6 + 1e-5 relative) let the CPU kernels run at 2-3x
# eager fp32's error at Sq, Sk ~ 1000 (one fp32 chain summing out, dq, dk, dv over every block;
# dS at fp32 noise where a row has one key): measured, the old kernels needed an atol of 7.5e-7
# (avx512, avx2) and 9.2e-7 (scalar) of the scale on this grid, today's 3.1e-7 at most. 5e-7 is
# about 4 fp32 ulps at the data's scale. The scalar path (CPUs without AVX2) has no FMA: each of
# its multiply-adds rounds twice, and it needs up to 5.3e-7 (113 x 1025, causal, head dim 128)
# with one thread, 8.1e-7 (1 x 1025, head dim 128) with all threads of `make test-tiers`: 1e-6
# there (which the old kernels' 9.2e-7 also meets: on scalar the rule no longer tells them apart).
# Shapes: one token, a few, odd lengths on both sides of a block, Sq != Sk both ways,
# decode rows; plain (MHA), causal and masked (with GQA).
FP32_ATOL = 1e-6 if _extension.build_info().get("cpu_isa") == "scalar" else 5e-7
FP32_SEQLENS = [(1, 1), (7, 7), (113, 113), (1023, 1023), (1025, 1025), (113, 1025), (1025, 113),
                (1, 1025), (7, 1023)]  # fmt: skip
FP32_HEAD_DIMS = [40, 64, 96, 128]


def check_fp32_flash_rule(q, k, v, mask=None, causal=False):
    grad = torch.randn(q.shape, dtype=torch.float64)
    got = run("cpu", q, k, v, grad, mask, causal=causal)
    want = run("reference64", q, k, v, grad, mask, causal=causal)
    eager = run("eager", q, k, v, grad, mask, causal=causal)
    names = ["out", "lse", "dq", "dk", "dv"]
    terms = want[4].abs().max().item()
    for i, name in enumerate(names):
        if name == "lse":
            continue  # float32 for every dtype: the parity grid judges it
        g, w, e = got[i].double(), want[i].double(), eager[i].double()
        finite_parts_match(g, w)
        fin = torch.isfinite(w)
        if not fin.any():
            continue
        scale = max(w[fin].abs().max().item(), terms if name in ("dq", "dk") else 0.0)
        err = (g - w)[fin].abs().max().item()
        eager_err = (e - w)[fin].abs().max().item()
        bound = 2 * eager_err + FP32_ATOL * scale
        assert err <= bound, (
            f"{name}: max error {err:.3e} > 2 x eager fp32's {eager_err:.3e} + "
            f"{FP32_ATOL:g} x {scale:.3g}"
        )


def fp32_flash_rule_cases():
    for sq, sk in FP32_SEQLENS:
        for d in FP32_HEAD_DIMS:
            yield pytest.param(1, 2, 2, sq, sk, d, "plain", id=f"{sq}x{sk}-d{d}-plain")
            if sq > 1:
                for kind in ("causal", "masked"):
                    yield pytest.param(1, 4, 2, sq, sk, d, kind, id=f"{sq}x{sk}-d{d}-{kind}-gqa")


def fp32_flash_rule_case(B, H, Hkv, Sq, Sk, D, kind):
    q, k, v = make_qkv(B, H, Hkv, Sq, Sk, D, torch.float32)
    mask = torch.rand(B, 1, Sq, Sk) > 0.3 if kind == "masked" else None
    check_fp32_flash_rule(q, k, v, mask, causal=kind == "causal")


# "parity_grid" and "cpu" in the id: tools/cpu_tiers.py runs it on every CPU tier.
@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize(("B", "H", "Hkv", "Sq", "Sk", "D", "kind"), list(fp32_flash_rule_cases()))
def test_parity_grid_fp32_flash_rule(backend, B, H, Hkv, Sq, Sk, D, kind):
    fp32_flash_rule_case(B, H, Hkv, Sq, Sk, D, kind)


def mask_of(kind, B, H, Sq, Sk, device="cpu", dtype=torch.float32):
    """Masks as users pass them: broadcast (never expanded), bool or additive float (``dtype``:
    q's, for the kinds in it)."""
    dev = {"device": device}
    if kind == "key_padding":  # (B, 1, 1, Sk): the last keys of batch 0 are padding
        m = torch.ones(B, 1, 1, Sk, dtype=torch.bool, **dev)
        m[0, ..., Sk // 2 :] = False
        return m
    if kind == "bool_dead_row":  # a random mask with query row 1 seeing nothing
        m = torch.rand(B, H, Sq, Sk, **dev) > 0.3
        m[:, :, 1] = False
        return m
    if kind == "float_grad":  # additive (1, H, Sq, Sk) bias that is trained (ALiBi-like)
        return (torch.randn(1, H, Sq, Sk, **dev) * 0.5).requires_grad_()
    if kind == "float_2d_inf":  # (Sq, Sk) float with -inf entries, as torch builds causal masks
        m = torch.randn(Sq, Sk, **dev)
        return m.masked_fill(torch.rand(Sq, Sk, **dev) < 0.2, float("-inf"))
    if kind == "own_dtype_grad":  # (B, 1, Sq, Sk) trained bias in q's dtype, some -inf: read as is
        m = torch.randn(B, 1, Sq, Sk, **dev).masked_fill(torch.rand(B, 1, Sq, Sk, **dev) < 0.1,
                                                        float("-inf"))  # fmt: skip
        return m.to(dtype).requires_grad_()
    raise AssertionError(kind)


MASKS = ["key_padding", "bool_dead_row", "float_grad", "float_2d_inf", "own_dtype_grad"]
# The GPU rows of the feature tests: attention has Triton kernels on the GPU (no CUDA C++ yet).
GPU_FEATURES = ["triton"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_masks(backend, device, dtype, kind, causal):
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 37, 70, 40
    check(backend, *make_qkv(B, H, Hkv, Sq, Sk, D, dtype, device),
          mask_of(kind, B, H, Sq, Sk, device, dtype), causal=causal)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_matches_reference_exactly(backend, dtype):
    # The same seeds give the same keep-mask as reference.dropout_keep: exact parity holds.
    check(backend, *make_qkv(2, 4, 2, 33, 65, 32, dtype), dropout_p=0.3, causal=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_is_reproducible_and_seeded(backend):
    q, k, v = make_qkv(1, 2, 2, 16, 48, 16, torch.float32)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(fastattn.attention(q, k, v, dropout_p=0.5, backend=backend))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(("backend", "device"), on_devices(["cpu"], ["cuda"]))
def test_the_op_at_dropout_p_one_gives_zeros(backend, device):
    # The schema allows dropout_p == 1 (the public functions refuse it): nothing is kept, so out
    # and every gradient are zeros, as the reference's, not the 0 * inf = NaN of 1 / (1 - p).
    dt = torch.float32 if device == "cpu" else torch.float16
    q = torch.randn(1, 2, 5, 16, device=device).to(dt)
    rng = torch.tensor([1, 2], device=device)
    out, lse = torch.ops.fastattn.attention(q, q, q, None, rng, 0.25, False, 0, 1.0, -1, -1, 0.0,
                                            None, None)  # fmt: skip
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(lse).all()
    ref, _ = reference.attention(q.double(), q.double(), q.double(), None, 0.25, False, 0, 1.0,
                                 rng)  # fmt: skip
    assert torch.equal(ref, torch.zeros_like(ref))
    if device == "cpu":  # (CUDA tensors' backward is the Triton kernel's)
        grads = torch.ops.fastattn.attention_backward(
            torch.randn_like(out), q, q, q, out, lse, None, rng, 0.25, False, 0, 1.0, -1, -1, 0.0,
            None, None, False, False,
        )  # fmt: skip
        for g in grads[:3]:
            assert torch.equal(g, torch.zeros_like(g))


def test_dropout_keep_statistics():
    # Keep rate, and no correlation between neighbouring keys or rows (a weak hash would show).
    p = 0.3
    keep = reference.dropout_keep(torch.tensor([7, 99]), 2, 4, 64, 512, p).double()
    assert abs(keep.mean().item() - (1 - p)) < 0.005  # 262144 draws: sd 0.0009
    for a, b in ((keep[..., 1:], keep[..., :-1]), (keep[:, :, 1:], keep[:, :, :-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.01
    rate = reference.dropout_keep(torch.tensor([1, 2]), 1, 1, 1, 100_000, 0.9).double().mean()
    assert abs(rate.item() - 0.1) < 0.005


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_fully_masked_rows_give_zeros_not_nan(backend, device, dtype):
    # Bottom-right causal with Sq > Sk hides every key from the first Sq - Sk queries, and the
    # key-padding mask hides every key of batch 1.
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 1, 9, 4, 16, dtype, device))
    m = torch.ones(2, 1, 1, 4, dtype=torch.bool, device=device)
    m[1] = False
    out, lse = fastattn.attention(q, k, v, causal=True, attn_mask=m, return_lse=True,
                                  backend=backend)  # fmt: skip
    out.backward(torch.ones_like(out))
    assert torch.all(out[:, :, :5] == 0) and torch.all(out[1] == 0)
    assert torch.all(lse[:, :, :5] == float("-inf")) and torch.all(lse[1] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, :, 5:]).all()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.all(q.grad[1] == 0) and torch.all(q.grad[:, :, :5] == 0)


# fp16 holds at most 65504. Scores of large q and k (here around 1e5) and the products dO V^T of
# values near the maximum exist in fp32 only: the kernels compute S, P, O and every gradient in
# fp32, as torch's fp16 SDPA on the CPU does, which is the eager result here (the reference chain
# in fp16 would overflow the scores).
@pytest.mark.parametrize("big_scores", [False, True])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_float16_extremes_stay_finite(backend, device, big_scores):
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 19, 70, 64
    q, k, v = make_qkv(B, H, Hkv, Sq, Sk, D, torch.float32, device)
    if big_scores:  # |scale * q.k| up to ~1e5: P nearly one-hot, lse ~1e5
        q, k = q * 300, k * 300
    v = (v * 20000).clamp(-65504, 65504)  # values (and so outputs) near fp16's maximum
    leaves = [t.half().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(B, H, Sq, D, dtype=torch.float64, device=device)
    out, lse = fastattn.attention(*leaves, return_lse=True, causal=True, backend=backend)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    eager = [t.detach().clone().requires_grad_() for t in leaves]
    want = reference.attention(*ref, None, None, True, Sk - Sq)
    # torch's own fp16 SDPA (bottom-right causal as an explicit mask)
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril(Sk - Sq)
    base = F.scaled_dot_product_attention(*eager, attn_mask=keep, enable_gqa=True)
    assert_parity(out, want[0], base, "out")
    assert_parity(lse.double(), want[1], what="lse", dtype=torch.float32)
    if big_scores:
        return  # gradients of nearly one-hot rows this large leave fp16's range legitimately
    got = torch.autograd.grad(out, leaves, grad.half())
    wants = torch.autograd.grad(want[0], ref, grad)
    bases = torch.autograd.grad(base, eager, grad.half())
    for name, g, w, e in zip(["dq", "dk", "dv"], got, wants, bases, strict=True):
        assert_parity(g, w, e, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_alignment(backend):
    # attention(): bottom-right (FlashAttention) for True, either by name; SDPA drop-in: top-left
    # (torch). Decode rows
    # (Sq=3 against 10 keys) see keys up to 7, 8, 9 bottom-right.
    q, k, v = make_qkv(1, 2, 2, 3, 10, 8, torch.float64 if backend != "triton" else torch.float32)
    qd, kd, vd = (t.double() for t in (q, k, v))
    keep = torch.arange(10).view(1, 10) <= torch.arange(3).view(3, 1) + 7
    want = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep)
    assert_parity(fastattn.attention(q, k, v, causal=True, backend=backend), want)
    assert_parity(fastattn.attention(q, k, v, causal="bottom_right", backend=backend), want)
    top = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)  # keys j <= i
    assert_parity(fastattn.attention(q, k, v, causal="top_left", backend=backend), top)
    os.environ["FASTATTN_BACKEND"] = backend
    try:
        got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    finally:
        del os.environ["FASTATTN_BACKEND"]
    assert_parity(got, F.scaled_dot_product_attention(qd, kd, vd, is_causal=True))


@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_noncontiguous_inputs(backend, device):
    # (batch, seqlen, heads, head_dim) storage viewed as (B, H, S, D): strides of a HF model.
    qkv = make_qkv(2, 4, 2, 21, 45, 24, torch.float32, device, layout="bshd")
    check(backend, *qkv, causal=True)


@pytest.mark.parametrize("shape", [(0, 4, 2, 8, 8), (1, 4, 2, 0, 8), (1, 4, 2, 8, 0)])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_empty_inputs(backend, device, shape):
    # batch 0, no queries, no keys (out 0 and lse -inf: every row sees nothing).
    B, H, Hkv, Sq, Sk = shape
    qkv = make_qkv(B, H, Hkv, Sq, Sk, 16, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in qkv)
    out, lse = fastattn.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.all(q.grad == 0) and torch.all(k.grad == 0)


@pytest.mark.parametrize(("backend", "device"), on_devices(["cpu", "triton"], GPU_FEATURES))
def test_deterministic_backward_is_bitwise_reproducible(backend, device):
    q, k, v = make_qkv(2, 4, 1, 70, 130, 32, torch.float32, device)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fastattn.attention(*leaves, causal=True, deterministic=True, backend=backend)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64_cpu(causal):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 5, 7, 6, torch.float64))
    bias = (torch.randn(1, 2, 5, 7, dtype=torch.float64) * 0.3).requires_grad_()

    def fn(q, k, v, bias):
        return fastattn.attention(q, k, v, attn_mask=bias, causal=causal, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_memory_is_linear_in_seqlen_cpu():
    # Forward + backward at seqlen 16384 (B 1, 8 heads, D 64, fp32): the score matrix would be
    # 8 GiB; the peak extra resident memory must stay a small multiple of q+k+v+o (128 MiB).
    script = textwrap.dedent("""
        import json, resource, torch, fastattn
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(3))
        fastattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="cpu")  # warm-up
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = fastattn.attention(q, k, v, causal=True, backend="cpu")
        out.backward(torch.ones_like(out))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"extra": peak - base, "qkvo": 4 * q.numel() * 4,
                          "finite": bool(torch.isfinite(q.grad).all())}))
    """)
    env = dict(os.environ, FASTATTN_POISON_OUTPUTS="0")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["finite"]
    # Gradients (3 x 32 MiB) and the autograd copies of out/grad add to q+k+v+o; 4x is ample.
    assert r["extra"] <= 4 * r["qkvo"], f"peak extra {r['extra'] / 2**20:.0f} MiB"


# ----------------------------------------------------------------- the SDPA drop-in
SDPA_CASES = [
    # (q shape, k shape, mask shape or None, is_causal, enable_gqa)
    ((2, 4, 33, 32), (2, 4, 33, 32), None, False, False),
    ((2, 4, 17, 32), (2, 4, 40, 32), None, True, False),  # top-left causal, Sq < Sk
    ((2, 4, 40, 32), (2, 4, 17, 32), None, True, False),  # Sq > Sk: no row is fully masked
    ((2, 8, 20, 40), (2, 2, 30, 40), (2, 1, 1, 30), False, True),  # GQA + key padding
    ((3, 20, 16), (3, 25, 16), (20, 25), False, False),  # 3-D (no heads), 2-D float mask
    ((2, 3, 2, 9, 16), (2, 3, 2, 11, 16), None, False, False),  # extra leading dim
]


@pytest.mark.parametrize(("qs", "ks", "ms", "is_causal", "gqa"), SDPA_CASES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sdpa_drop_in_matches_torch(backend, qs, ks, ms, is_causal, gqa):
    q = torch.randn(qs, requires_grad=True)
    k, v = (torch.randn(ks, requires_grad=True) for _ in range(2))
    mask = None
    if ms is not None:
        mask = torch.rand(ms) > 0.3 if len(ms) == 4 else torch.randn(ms)
    kw = dict(attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    os.environ["FASTATTN_BACKEND"] = backend
    try:
        got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    finally:
        del os.environ["FASTATTN_BACKEND"]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    assert_parity(got, want)
    g = torch.randn_like(got)
    mine = torch.autograd.grad(got, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g.double())
    for a, b in zip(mine, ref, strict=True):
        assert_parity(a, b.double())


# ------------------------------------------------------------------------- bad input
def _qkv(q=(2, 4, 8, 16), k=(2, 2, 10, 16), v=None, dt=torch.float32, kdt=None):
    return (torch.randn(q).to(dt), torch.randn(k).to(kdt or dt), torch.randn(v or k).to(kdt or dt))


BAD_INPUTS = [
    (lambda: fastattn.attention(*_qkv(q=(4, 8, 16))), ValueError, r"q must be 4-D .*\(4, 8, 16\)"),
    (lambda: fastattn.attention(*_qkv(k=(3, 2, 10, 16))), ValueError, r"matching q's batch"),
    (lambda: fastattn.attention(*_qkv(k=(2, 2, 10, 8))), ValueError, r"head_dim.*\(2, 2, 10, 8\)"),
    (lambda: fastattn.attention(*_qkv(v=(2, 2, 11, 16))), ValueError, r"v \(2, 2, 11, 16\)"),
    (lambda: fastattn.attention(*_qkv(k=(2, 3, 10, 16))), ValueError, r"heads \(4\).*\(3\)"),
    (lambda: fastattn.attention(*_qkv(kdt=torch.bfloat16)), TypeError, "share one dtype"),
    (lambda: fastattn.attention(*_qkv(dt=torch.int32)), TypeError, "floating point"),
    (
        lambda: fastattn.attention(*_qkv(q=(1, 2, 4, 300), k=(1, 2, 4, 300))),
        ValueError,
        "head_dim 300 exceeds",
    ),
    (lambda: fastattn.attention(*_qkv(), dropout_p=1.0), ValueError, r"dropout_p .*\[0, 1\)"),
    (lambda: fastattn.attention(*_qkv(), causal="topleft"), ValueError, "got 'topleft'"),
    (lambda: fastattn.attention(*_qkv(), causal=1), TypeError, "causal must be a bool"),
    (
        lambda: fastattn.attention(*_qkv(), attn_mask=torch.ones(2, 1, 8, 9, dtype=torch.bool)),
        ValueError,
        r"mask of shape \(2, 1, 8, 9\) is not broadcastable",
    ),
    (
        lambda: fastattn.attention(*_qkv(), attn_mask=torch.ones(8, 10, dtype=torch.int64)),
        TypeError,
        "torch.int64",
    ),
    (
        lambda: fastattn.attention(torch.randn(1, 1, 2, 4), *_qkv(k=(1, 1, 2, 4))[1:], scale="x"),
        TypeError,
        "scale",
    ),
    (
        lambda: fastattn.attention(*_qkv(), backend="cuda"),
        RuntimeError,
        "backend 'cuda' cannot run this call",
    ),
    (
        lambda: fastattn.scaled_dot_product_attention(
            *_qkv(), attn_mask=torch.ones(8, 10, dtype=torch.bool), is_causal=True
        ),
        ValueError,
        "not both",
    ),
    (
        lambda: fastattn.scaled_dot_product_attention(*_qkv()),
        ValueError,
        "enable_gqa=True",
    ),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_is_rejected_in_python(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# The fast accept path restates the checks for the common call (hot in decode steps): pinned here
# to the full checks, on the whole bad-input corpus and on good calls.
@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_fast_accept_path_refuses_exactly_what_the_full_checks_refuse(monkeypatch, call, exc,
                                                                      match):  # fmt: skip
    import fastattn.ops.attention as ops

    refuses_as_the_full_checks(monkeypatch, ops, call, exc)


def test_fast_accept_path_accepts_the_common_call_as_the_full_checks_do(monkeypatch):
    import fastattn.ops.attention as ops

    q, k, v = _qkv()
    calls = [lambda: fastattn.attention(q, k, v), lambda: fastattn.attention(q, k, v, causal=True)]
    assert ops._plain(q, k, v)  # the common call does take the fast path
    accepts_as_the_full_checks(monkeypatch, ops, calls)


def test_device_mismatch_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        fastattn.attention(q, k.to("meta"), v)


# No window, no softcap, no sinks, no ALiBi: the trailing arguments of the ops.
PLAIN = (-1, -1, 0.0, None, None)


def _cpp(q=(2, 4, 8, 16), k=(2, 2, 10, 16), mask=None, rng=None, p=0.0, dt=torch.float32,
         variants=PLAIN):  # fmt: skip
    qq, kk, vv = _qkv(q, k, dt=dt)
    return torch.ops.fastattn.attention(qq, kk, vv, mask, rng, 0.25, False, 0, p, *variants)


# The C++ entry checks again (TORCH_CHECK) for callers that use torch.ops directly.
CPP_BAD_INPUTS = [
    lambda: _cpp(k=(2, 2, 10, 8)),  # head_dim mismatch
    lambda: _cpp(k=(2, 3, 10, 16)),  # heads not a multiple of kv heads
    lambda: _cpp(k=(3, 2, 10, 16)),  # batch mismatch
    lambda: _cpp(q=(2, 4, 8, 300), k=(2, 2, 10, 300)),  # head_dim above the maximum
    lambda: _cpp(mask=torch.ones(2, 4, 8, 9, dtype=torch.bool)),  # mask not (B, H, Sq, Sk)
    lambda: _cpp(mask=torch.ones(2, 4, 8, 10, dtype=torch.int32)),  # integer mask
    lambda: _cpp(p=0.5),  # dropout without seeds
    lambda: _cpp(dt=torch.int64),  # integer inputs
    lambda: torch.ops.fastattn.attention(  # last dim not contiguous
        torch.randn(2, 4, 16, 8).transpose(-1, -2),
        *_qkv()[1:],
        None,
        None,
        0.25,
        False,
        0,
        0.0,
        *PLAIN,
    ),
    lambda: _cpp(variants=(-2, -1, 0.0, None, None)),  # window size below -1
    lambda: _cpp(variants=(-1, -1, -1.0, None, None)),  # negative softcap
    lambda: _cpp(variants=(-1, -1, float("inf"), None, None)),  # infinite softcap
    lambda: _cpp(variants=(-1, -1, 0.0, torch.zeros(3), None)),  # sinks not (heads,)
    lambda: _cpp(variants=(-1, -1, 0.0, torch.zeros(4, dtype=torch.float64), None)),  # dtype
    lambda: _cpp(variants=(-1, -1, 0.0, None, torch.zeros(4))),  # alibi not (batch, heads)
    lambda: _cpp(variants=(-1, -1, 0.0, None, torch.zeros(2, 4, dtype=torch.bfloat16))),
]


@pytest.mark.parametrize("call", CPP_BAD_INPUTS)
def test_bad_input_is_rejected_in_cpp(call):
    with pytest.raises(RuntimeError, match="fastattn"):
        call()


# -------------------------------------------------------------- torch.library / compile
def opcheck_samples(other_dv: bool):
    q, k, v = _qkv(q=(1, 4, 5, 8), k=(1, 2, 7, 8))
    yield (q, k, v, None, None, 0.3, True, 2, 0.0, *PLAIN)
    bias = torch.randn(1, 1, 5, 7, requires_grad=True).expand(1, 4, 5, 7)
    yield (q.requires_grad_(), k, v, bias, torch.tensor([3, 4]), 0.3, False, 0, 0.25, *PLAIN)
    keep = (torch.rand(1, 1, 1, 7) > 0.3).expand(1, 4, 5, 7)
    yield (q, k.requires_grad_(), v.requires_grad_(), keep, None, 0.5, True, 0, 0.0, *PLAIN)
    # window, softcap, sinks (with their gradient), ALiBi; v's own head_dim (C++ op only)
    sinks = torch.randn(4, requires_grad=True)
    slopes = torch.rand(4).expand(1, 4)
    yield (q, k, v, keep, None, 0.3, False, 2, 0.0, 1, 3, 0.0, sinks, None)
    yield (q, k, v, None, None, 0.3, True, 2, 0.0, 2, 0, 5.0, sinks, slopes)
    if other_dv:
        v6 = torch.randn(1, 2, 7, 6, requires_grad=True)
        yield (q, k, v6, None, None, 0.3, True, 2, 0.0, 2, 0, 5.0, sinks, slopes)


@pytest.mark.parametrize("op", ["attention", "attention_triton"])
def test_opcheck(op):
    extra = (False,) if op == "attention_triton" else ()
    for args in opcheck_samples(other_dv=op == "attention"):
        torch.library.opcheck(getattr(torch.ops.fastattn, op), (*args, *extra))
        out, lse = getattr(torch.ops.fastattn, op)(*args, *extra)
        # The backward op has no derivative of its own: opcheck it on tensors without grad.
        q, k, v, mask, rng, scale, causal, offset, p, wl, wr, cap, sinks, alibi = (
            a.detach() if isinstance(a, torch.Tensor) else a for a in args
        )
        out, lse = out.detach(), lse.detach()
        bwd_args = (torch.randn_like(out), q, k, v, out, lse, mask, rng, scale, causal, offset,
                    p, wl, wr, cap, sinks, alibi, True,
                    mask is not None and mask.dtype != torch.bool)  # fmt: skip
        torch.library.opcheck(getattr(torch.ops.fastattn, op + "_backward"), bwd_args)


# Dynamo cannot trace the default-device mode through Tensor.unflatten: this test keeps the real
# default device (its tensors all name their device; the other device-parametrized tests check).
@pytest.mark.real_default
@pytest.mark.parametrize(("backend", "device"), on_devices(["cpu", "triton"], GPU_FEATURES))
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    w = torch.randn(32, 64, device=device) * 0.2

    def block(x, bias, backend=backend):  # projections, GQA attention with a bias, a residual
        q, k, v = (x @ w.to(x.dtype)).split([32, 16, 16], dim=-1)
        q = q.unflatten(-1, (4, 8)).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in (k, v))
        o = fastattn.attention(q, k, v, causal=True, attn_mask=bias, backend=backend)
        return x + o.transpose(1, 2).flatten(-2)

    x = torch.randn(2, 12, 32, device=device, requires_grad=True)
    bias = torch.randn(1, 4, 1, 12, device=device, requires_grad=True)
    y = torch.compile(block, fullgraph=True)(x, bias)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bias), g)
    want_y = block(x.double(), bias.double(), "reference")
    want = torch.autograd.grad(want_y, (x, bias), g.double())
    assert_parity(y, want_y)
    for a, b in zip(got, want, strict=True):
        assert_parity(a, b.double())


# ------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("Sq", "Sk"), SEQLENS + [(1, 8192), (1023, 4097)])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize(("backend", "device"), on_devices([], ["triton", "cuda", "reference"]))
def test_parity_gpu(backend, device, D, Sq, Sk, dtype, causal):
    qkv = make_qkv(2, 8, 2, Sq, Sk, D, dtype, device)
    if backend == "cuda" and dtype == torch.float32:  # tensor cores on 16-bit inputs only
        with pytest.raises(RuntimeError, match="take bfloat16, float16, not torch.float32"):
            fastattn.attention(*qkv, causal=causal, backend=backend)
        return
    check(backend, *qkv, causal=causal)


# The CUDA C++ forward (backward: the Triton kernels') on the feature tests' cases, in the dtypes
# it takes: masks (one with a gradient), dropout, rows without keys, strided and empty inputs.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [*MASKS, "dropout", "dead_rows", "bshd", "empty"])
@pytest.mark.parametrize(("backend", "device"), on_devices([], ["cuda"]))
def test_cuda_features(backend, device, dtype, case):
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 37, 70, 40
    if case in MASKS:
        qkv = make_qkv(B, H, Hkv, Sq, Sk, D, dtype, device)
        check(backend, *qkv, mask_of(case, B, H, Sq, Sk, device, dtype), causal=True)
    elif case == "dropout":  # the op on given seeds against the reference's keep-mask
        q, k, v = make_qkv(B, H, Hkv, Sq, Sk, D, dtype, device)
        rng = torch.tensor([123, 4567], dtype=torch.int64, device=device)
        args = (None, D**-0.5, True, Sk - Sq, 0.3, rng)
        out, lse = torch.ops.fastattn.attention(q, k, v, None, rng, D**-0.5, True, Sk - Sq, 0.3,
                                                -1, -1, 0.0, None, None)  # fmt: skip
        want = reference.attention(q.double(), k.double(), v.double(), *args)
        eager = reference.attention(q, k, v, *args, opmath=dtype)
        assert_parity(out, want[0], eager[0], "out")
        assert_parity(lse.double(), want[1], what="lse", dtype=torch.float32)
    elif case == "dead_rows":  # bottom-right causal with Sq > Sk: 33 queries see no key
        check(backend, *make_qkv(B, H, Hkv, Sq + 33, Sq, D, dtype, device), causal=True)
    elif case == "bshd":
        check(backend, *make_qkv(B, H, Hkv, Sq, Sk, D, dtype, device, layout="bshd"), causal=True)
    else:
        for shape in [(0, 4, 2, 8, 8), (1, 4, 2, 0, 8), (1, 4, 2, 8, 0)]:
            q, k, v = make_qkv(*shape, 16, dtype, device)
            out, lse = fastattn.attention(q, k, v, return_lse=True, backend=backend)
            assert out.shape == q.shape and not out.any() and torch.isneginf(lse).all()
