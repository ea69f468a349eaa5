"""Attention benchmark cases (``fastattn-bench attention``): self-attention forward and
forward+backward, causal and not, and a grouped-query decode step; GFLOP/s and peak memory; then
the window / softcap / sinks / ALiBi cases of cases_attention_variants.py."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastattn.bench.framework import (
    DTYPE_NAMES,
    Case,
    Impl,
    Inputs,
    Options,
    Out,
    backend_label,
    call_with,
    compiled,
    fwd_bwd,
    oracle,
    randn,
    register,
)

__all__ = [
    "ATTN_QUICK_SHAPES",
    "ATTN_SHAPES",
    "EAGER_BF16_NOTE",
    "attention_cases",
    "attention_dims",
    "attention_flops",
    "eager_attention",
]

# Shapes (batch, heads, seqlen, head_dim) of self-attention, and (batch, heads, kv_heads,
# seqlen_q, seqlen_k, head_dim) of decoding against a KV cache (grouped-query, forward only).
ATTN_SHAPES: tuple[tuple[int, ...], ...] = (
    (1, 8, 512, 64),
    (1, 8, 1024, 64),
    (1, 8, 2048, 64),
    (1, 8, 2048, 128),
    (1, 8, 4096, 64),
    (1, 8, 4096, 128),
    (1, 32, 8, 1, 8192, 128),
)
ATTN_QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((1, 2, 128, 32), (1, 4, 2, 1, 512, 32))


def attention_dims(shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """(B, H, Hkv, Sq, Sk, D) of a ``BxHxSxD`` or ``BxHxHkvxSqxSkxD`` shape."""
    if len(shape) == 4:
        b, h, s, d = shape
        return b, h, h, s, s, d
    if len(shape) == 6:
        b, h, hkv, sq, sk, d = shape
        if h % hkv:
            raise ValueError(f"attention shape {shape}: heads {h} not a multiple of kv_heads")
        return b, h, hkv, sq, sk, d
    raise ValueError(f"attention shape {shape}: expected BxHxSxD or BxHxHkvxSqxSkxD")


def attention_flops(shape: tuple[int, ...], causal: bool, bwd: bool) -> int:
    """4*B*H*Sq*Sk*D for the two matrix products of the forward pass, half of it when causal
    (the skipped blocks), 3.5 times that with the backward (FlashAttention's count)."""
    b, h, _, sq, sk, d = attention_dims(shape)
    f = 4 * b * h * sq * sk * d // (2 if causal else 1)
    return f * 7 // 2 if bwd else f


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    """The textbook composition in the input's dtype: ``softmax(q @ k^T * scale) @ v``, k and v
    repeated over the query heads of their group (grouped-query attention), the causal mask
    aligned bottom-right (the same as top-left when seqlen_q == seqlen_k)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        sq, sk = s.shape[-2:]
        hide = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(sk - sq + 1)
        s = s.masked_fill(hide, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _eager_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return eager_attention(q, k, v, causal=False)


def _eager_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return eager_attention(q, k, v, causal=True)


def _attn_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype, grad: bool) -> Inputs:
    b, h, hkv, sq, sk, d = attention_dims(shape)
    inp = {
        "q": randn((b, h, sq, d), dt, dev, 0),
        "k": randn((b, hkv, sk, d), dt, dev, 1),
        "v": randn((b, hkv, sk, d), dt, dev, 2),
    }
    if grad:
        for t in inp.values():
            t.requires_grad_()
        inp["g"] = randn((b, h, sq, d), dt, dev, 3)
    return inp


# Eager attention in bf16 rounds the (Sq, Sk) scores and probabilities to bf16: at 4096 keys its
# error reaches ~1.2x the bf16 bound of the oracle check (fastattn keeps them in fp32).
EAGER_BF16_NOTE = "eager bf16 rounds the scores and probabilities to bf16"


@register("attention", default=False)  # ~15 min at full size here: `make bench-attention`
def attention_cases(opts: Options) -> list[Case]:
    """fastattn.attention against eager attention, F.scaled_dot_product_attention and
    torch.compile of the eager version ("F.sdpa" in the tables is F.scaled_dot_product_attention):
    forward and forward+backward (dq, dk, dv checked),
    causal and not, and a grouped-query decode step (forward only); the forward also against
    onnxruntime and OpenVINO (peers.py). Reports GFLOP/s, % of the machine's measured peak
    and each call's peak extra memory besides ms and GB/s."""
    import fastattn
    from fastattn import reference

    be = opts.backend
    peak = opts.peak_gflops
    qkv = ("q", "k", "v")
    cases: list[Case] = []
    for shape in opts.shapes or (ATTN_QUICK_SHAPES if opts.quick else ATTN_SHAPES):
        b, h, hkv, sq, sk, d = attention_dims(shape)
        gqa = h != hkv
        # self-attention: fwd/fwd+bwd x full/causal; 6-dim shapes (decode): forward, not causal
        flags = (False, True)
        modes = [(False, False)] if len(shape) == 6 else [(c, w) for w in flags for c in flags]
        for dt in opts.dtypes:
            es = torch.empty((), dtype=dt).element_size()
            io = (2 * b * h * sq * d + 2 * b * hkv * sk * d) * es  # q, o; k, v
            for causal, bwd in modes:

                def fast(i: Inputs, causal: bool = causal) -> Out:
                    out: Out = fastattn.attention(i["q"], i["k"], i["v"], causal=causal, backend=be)
                    return out

                def sdpa(i: Inputs, causal: bool = causal, gqa: bool = gqa) -> Out:
                    return F.scaled_dot_product_attention(
                        i["q"], i["k"], i["v"], is_causal=causal, enable_gqa=gqa
                    )

                def ref(i: Inputs, causal: bool = causal, off: int = sk - sq) -> Out:
                    return reference.attention(i["q"], i["k"], i["v"], None, None, causal, off)[0]

                eager = _eager_causal if causal else _eager_full
                low = dt in (torch.bfloat16, torch.float16)
                impls = [
                    Impl(backend_label("attention", opts, dt), fast, subject=True),
                    Impl("eager", call_with(eager, *qkv), inexact=EAGER_BF16_NOTE * low),
                    Impl("F.sdpa", sdpa),
                ]
                if opts.compile:
                    impls.append(Impl("compile(eager)", call_with(compiled(eager), *qkv)))
                if bwd:
                    impls = [Impl(m.name, fwd_bwd(m.fn, qkv), m.subject) for m in impls]
                elif opts.runtimes:
                    from fastattn.bench import peers

                    dims = (b, h, hkv, sq, sk, d)
                    impls += peers.attention_peers(dims, causal, dt, opts.device)
                variant = ("fwd+bwd" if bwd else "fwd") + (" causal" if causal else "")
                if len(shape) == 6:
                    variant = ("decode " if sq <= 16 else "") + variant + (f" GQA {h}/{hkv}" * gqa)
                make = functools.partial(_attn_inputs, shape=shape, dt=dt, grad=bwd)
                # forward: q, k, v read, o written; backward: q, k, v, o, do read, dq, dk, dv
                # written: three times the forward
                nbytes = 3 * io if bwd else io
                oracle_fn = oracle(ref, qkv if bwd else None)
                case = Case("attention", variant, shape, dt, make, oracle_fn, nbytes, impls)
                case.flops = attention_flops(shape, causal, bwd)
                case.peak_gflops = peak.get(DTYPE_NAMES.get(dt, ""), math.nan)
                case.memory = True
                cases.append(case)
    if not opts.shapes:  # the window, softcap, sinks and ALiBi cases (cases_attention_variants)
        from fastattn.bench.cases_attention_variants import variant_cases

        cases += variant_cases(opts)
    return cases
