"""The AOT spec list of the Triton attention kernels, for ``fastattn._aot`` (which compiles each
for sm_80 and sm_90, with and without the 16-byte alignment hints the JIT adds at run time)."""

from __future__ import annotations

from typing import Any

import torch

from fastattn.ops._attention_triton import attn_combine_kernel, attn_fwd_kernel
from fastattn.ops._attention_triton_bwd import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_pre_kernel,
    pre_block_m,
)
from fastattn.ops._attention_triton_common import (
    MAX_SPLITS,
    dkdv_configs,
    dot_precision,
    dq_configs,
    fwd_configs,
    kv_tier,
    split_config,
)

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOATS = {"scale", "qk_scale", "drop_scale", "cap2"}
_VARIANTS_OFF = {"SOFTCAP": False, "ALIBI": False, "WINDOW": False, "SINKS": False}
_VARIANTS_ON = {"SOFTCAP": True, "ALIBI": True, "WINDOW": True, "SINKS": True}


def _signature(kernel: Any, ptrs: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Every non-constexpr argument of ``kernel``: pointers from ``ptrs``, floats, else i32."""
    return {
        a: ptrs.get(a) or ("fp32" if a in _FLOATS else "i32")
        for a in kernel.arg_names
        if a not in constexprs
    }


def _spec(name: str, kernel: Any, ptrs: dict[str, str], cx: dict[str, Any], cfg: tuple) -> dict:
    m, n, w, s = cfg
    constexprs = {**cx, "BLOCK_M": m, "BLOCK_N": n}
    return {
        "id": f"{name}-m{m}n{n}w{w}s{s}",
        "kernel": kernel,
        "signature": _signature(kernel, ptrs, constexprs),
        "constexprs": constexprs,
        "num_warps": w,
        "num_stages": s,
        # the JIT's usual specialisation: a contiguous mask row (column stride 1)
        "aligned_constexprs": {"s_mn": 1} if cx.get("HAS_MASK") else {},
    }


# (BLOCK_D, BLOCK_DV) of the specs with a value head dim of its own (multi-head latent
# attention): DeepSeek's 192 / 128 (tier 256) and a small one (24 / 16: tier 64).
DV_BLOCKS = ((256, 128), (32, 16))


def aot_specs() -> Any:
    """A representative subset of the attention kernels' configurations.

    Per head-dim tier (BLOCK_D 64, 128, 256): every autotune tile of the forward, dK/dV and dQ
    kernels in fp16 with every feature on (mask of q's dtype, causal, dropout, dmask, atomic
    dQ: the most code and registers); the pinned tile in bf16 with the other mask kind (bool)
    and nothing else (the deterministic dQ path of dK/dV), and in fp32 (own tiles, tf32x3
    dots) with every feature on; the split-K forward in fp16 and fp32; the combine in each
    dtype; the dO.O preprocess. Then the variants (window, softcap, ALiBi, sinks: all on, causal,
    no mask or dropout, as Gemma 2 / gpt-oss / Mistral call them) with every tile of the fp16
    lists (their own where those spill: ``VARIANT_CONFIGS``) and the pinned fp32 tile. The same
    again, but the preprocess and combine (whose only head dim is v's, compiled above), for v's
    own head dims ``DV_BLOCKS`` (ids ``...-<dtype>-d<BLOCK_D>v<BLOCK_DV>-...``). The full
    cross-product (tiles x dtypes x flags x 5 head-dim blocks) would be ~1000 compiles; the
    flags only add elementwise code to the same tiles, so shared memory, registers and the
    tensor-core path are those checked here. BLOCK_D 16 and 32 use the 64-tier tiles with less
    memory.
    """
    for tier in (64, 128, 256):
        block_d = tier
        pre = {"Out": "*bf16", "DO": "*bf16", "DELTA": "*fp32"}
        yield {
            "id": f"attn_bwd_pre-d{block_d}",
            "kernel": attn_bwd_pre_kernel,
            "signature": _signature(attn_bwd_pre_kernel, pre, {"BLOCK_M": 0, "BLOCK_DV": 0}),
            "constexprs": {"BLOCK_M": pre_block_m(block_d), "BLOCK_DV": block_d},
            "num_warps": 4,
        }
        for dtype, t in _TRITON_TYPE.items():
            yield from _tile_specs(tier, block_d, block_d, dtype, t)
            cxc = {"SPLITS": MAX_SPLITS, "SINKS_ON": t == "fp16", "BLOCK_DV": block_d,
                   "RNE_BF16": t == "bf16"}  # fmt: skip
            ptrs = {"OP": "*fp32", "LP": "*fp32", "Out": f"*{t}", "LSE": "*fp32",
                    "Sinks": "*fp32"}  # fmt: skip
            yield {
                "id": f"attn_combine-d{block_d}-{t}",
                "kernel": attn_combine_kernel,
                "signature": _signature(attn_combine_kernel, ptrs, cxc),
                "constexprs": cxc,
                "num_warps": 4,
            }
    for block_d, block_dv in DV_BLOCKS:
        for dtype, t in _TRITON_TYPE.items():
            yield from _tile_specs(kv_tier(block_d, block_dv), block_d, block_dv, dtype, t)


def _tile_specs(tier: int, block_d: int, block_dv: int, dtype: torch.dtype, t: str) -> Any:
    """The forward, dK/dV, dQ and split-K specs of one (tier, head dims, dtype) of aot_specs."""
    on = t != "bf16"  # every feature on, or a bool mask and nothing else
    mk = t if on else "u8"
    dims = "" if block_dv == block_d else f"-d{block_d}v{block_dv}"
    base = f"{tier}-{t}{dims}-mask_{mk}-c{int(on)}-p{int(on)}"
    cx = {"HAS_MASK": True, "MASK_BOOL": not on, "CAUSAL": on, "DROPOUT": on,
          "UPCAST": False, "PREC": dot_precision(dtype), "BLOCK_D": block_d,
          "BLOCK_DV": block_dv, "OWN_DV": block_dv != block_d, **_VARIANTS_OFF}  # fmt: skip
    io = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "LSE": "*fp32", "M": f"*{mk}",
          "RNG": "*i64", "Sinks": "*fp32", "Alibi": "*fp32"}  # fmt: skip
    every = t == "fp16"
    blocks = (block_d, block_dv)
    fwd, dkdv, dq = (f(dtype, tier, False, blocks) for f in (fwd_configs, dkdv_configs, dq_configs))
    for cfg in fwd if every else fwd[:1]:
        cxf = {**cx, "RNE_BF16": False}
        yield _spec(f"attn_fwd-{base}", attn_fwd_kernel, {**io, "Out": f"*{t}"}, cxf, cfg)
    bwd_io = {**io, "DO": f"*{t}", "DELTA": "*fp32", "DQ": "*fp32", "DK": f"*{t}",
              "DV": f"*{t}", "DM": "*fp32"}  # fmt: skip
    for cfg in dkdv if every else dkdv[:1]:
        cxb = {**cx, "MASK_GRAD": on, "ATOMIC_DQ": on, "RNE_BF16": False}
        yield _spec(f"attn_bwd_dkdv-{base}", attn_bwd_dkdv_kernel, bwd_io, cxb, cfg)
    for cfg in dq if every else dq[:1]:
        cxq = {**cx, "RNE_BF16": False}
        ptrs = {**bwd_io, "DQ": f"*{t}"}
        yield _spec(f"attn_bwd_dq-{base}", attn_bwd_dq_kernel, ptrs, cxq, cfg)
    if on:  # decode split-K, writing fp32 partials
        cxf = {**cx, "RNE_BF16": False}
        ptrs = {**io, "Out": "*fp32"}
        cfg = split_config(dtype, tier, False, blocks)
        yield _spec(f"attn_fwd_split-{base}", attn_fwd_kernel, ptrs, cxf, cfg)
    if t != "bf16":  # (bf16 compiles as fp16 here: the same registers, checked once)
        yield from _variant_specs(tier, block_d, block_dv, dtype, t, io)


def _variant_specs(tier: int, block_d: int, block_dv: int, dtype: torch.dtype, t: str,
                   io: dict[str, str]) -> Any:  # fmt: skip
    """The forward, dK/dV and dQ kernels with window, softcap, ALiBi and sinks on (causal, no
    mask, no dropout), every tile of the fp16 lists (bf16's spill the same: measured), the
    pinned fp32 one; and the split-K forward (whose sinks join in the combine)."""
    cx = {"HAS_MASK": False, "MASK_BOOL": False, "CAUSAL": True, "DROPOUT": False,
          "UPCAST": False, "PREC": dot_precision(dtype), "BLOCK_D": block_d,
          "BLOCK_DV": block_dv, "OWN_DV": block_dv != block_d, **_VARIANTS_ON,
          "RNE_BF16": False}  # fmt: skip
    dims = "" if block_dv == block_d else f"-d{block_d}v{block_dv}"
    base = f"{tier}-{t}{dims}-variants"
    every = t == "fp16"
    blocks = (block_d, block_dv)
    fwd, dkdv, dq = (f(dtype, tier, True, blocks) for f in (fwd_configs, dkdv_configs, dq_configs))
    for cfg in fwd if every else fwd[:1]:
        yield _spec(f"attn_fwd-{base}", attn_fwd_kernel, {**io, "Out": f"*{t}"}, cx, cfg)
    bwd_io = {**io, "DO": f"*{t}", "DELTA": "*fp32", "DQ": "*fp32", "DK": f"*{t}",
              "DV": f"*{t}", "DM": "*fp32"}  # fmt: skip
    for cfg in dkdv if every else dkdv[:1]:
        cxb = {**cx, "MASK_GRAD": False, "ATOMIC_DQ": True}
        yield _spec(f"attn_bwd_dkdv-{base}", attn_bwd_dkdv_kernel, bwd_io, cxb, cfg)
    for cfg in dq if every else dq[:1]:
        yield _spec(f"attn_bwd_dq-{base}", attn_bwd_dq_kernel, {**bwd_io, "DQ": f"*{t}"}, cx,
                    cfg)  # fmt: skip
    cxs = {**cx, "SINKS": False}
    yield _spec(f"attn_fwd_split-{base}", attn_fwd_kernel, {**io, "Out": "*fp32"}, cxs,
                split_config(dtype, tier, True, blocks))  # fmt: skip
