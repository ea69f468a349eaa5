"""``fastattn-bench paged`` (issue 16): one batched decode step of 32 sequences of different
context lengths against a paged KV cache (block size 16) — fastattn's paged attention — against
torch's SDPA and fastattn's own dense attention over the same keys in a dense cache padded to the
longest (with the key-padding mask that needs). The oracle is the float64 reference on each
sequence's keys alone."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastattn.bench.framework import DTYPE_NAMES, Case, Impl, Inputs, Options, Out, register

__all__ = ["PAGED_SHAPE", "paged_cases"]

# (sequences, heads, kv_heads, head_dim, block_size) and the context lengths' range.
PAGED_SHAPE, CONTEXT = (32, 32, 8, 128, 16), (256, 8192)
QUICK_SHAPE, QUICK_CONTEXT = (4, 4, 2, 32, 16), (16, 200)


def _inputs(dev: torch.device, shape: tuple, context: tuple, dt: torch.dtype) -> Inputs:
    B, H, Hkv, D, bs = shape
    g = torch.Generator().manual_seed(21)
    lengths = torch.randint(context[0], context[1] + 1, (B,), generator=g)
    longest = int(lengths.max())
    dense_k = torch.randn(B, Hkv, longest, D, generator=g).to(dt)
    dense_v = torch.randn(B, Hkv, longest, D, generator=g).to(dt)
    need = [-(-int(n) // bs) for n in lengths]
    perm = torch.randperm(sum(need), generator=g)  # blocks scattered through the cache
    k_cache = torch.zeros(sum(need), bs, Hkv, D, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    table = torch.zeros(B, max(need), dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths.tolist()):
        ids = perm[used : used + need[b]]
        used += need[b]
        table[b, : need[b]] = ids.to(torch.int32)
        pad = need[b] * bs - n
        kb = F.pad(dense_k[b, :, :n], (0, 0, 0, pad)).view(Hkv, need[b], bs, D).transpose(0, 1)
        vb = F.pad(dense_v[b, :, :n], (0, 0, 0, pad)).view(Hkv, need[b], bs, D).transpose(0, 1)
        k_cache[ids], v_cache[ids] = kb.transpose(1, 2), vb.transpose(1, 2)
    keep = torch.arange(longest)[None, :] < lengths[:, None]  # (B, longest) key padding
    q = torch.randn(B, 1, H, D, generator=g).to(dt)
    out = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "table": table,
           "lengths": lengths.to(torch.int32), "dense_k": dense_k, "dense_v": dense_v,
           "keep": keep}  # fmt: skip
    return {k: t.to(dev) for k, t in out.items()}


def _paged(i: Inputs) -> Out:
    import fastattn

    out: Out = fastattn.paged_attention(i["q"], i["k_cache"], i["v_cache"], i["table"],
                                        i["lengths"])  # fmt: skip
    return out


def _dense_fastattn(i: Inputs) -> Out:
    import fastattn

    keep = i["keep"][:, None, None, :]  # (B, 1, 1, longest)
    out = fastattn.attention(i["q"].transpose(1, 2), i["dense_k"], i["dense_v"], attn_mask=keep)
    assert isinstance(out, torch.Tensor)
    return out.transpose(1, 2)


def _sdpa(i: Inputs) -> Out:
    keep = i["keep"][:, None, None, :]
    out = F.scaled_dot_product_attention(i["q"].transpose(1, 2), i["dense_k"], i["dense_v"],
                                         attn_mask=keep, enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2)


def _oracle(i: Inputs) -> Out:
    from fastattn import reference

    outs = []
    for b, n in enumerate(i["lengths"].tolist()):
        q = i["q"][b].transpose(0, 1)[None].double()
        k, v = (i[x][b : b + 1, :, :n].double() for x in ("dense_k", "dense_v"))
        outs.append(reference.attention(q, k, v)[0][0].transpose(0, 1))
    return torch.stack(outs)


@register("paged", default=False)
def paged_cases(opts: Options) -> list[Case]:
    """A decode step of 32 sequences (contexts 256-8192, GQA 32/8, head dim 128, blocks of 16)."""
    shape, context = (QUICK_SHAPE, QUICK_CONTEXT) if opts.quick else (PAGED_SHAPE, CONTEXT)
    B, H, Hkv, D, bs = shape
    cases = []
    for dt in opts.dtypes:
        if dt not in (torch.float32, torch.bfloat16):
            continue
        impls = [
            Impl("fastattn paged", _paged, subject=True),
            Impl("fastattn dense cache (padded)", _dense_fastattn),
            Impl("F.sdpa dense cache (padded)", _sdpa),
        ]
        make = functools.partial(_inputs, shape=shape, context=context, dt=dt)
        es = torch.empty((), dtype=dt).element_size()
        mean = (context[0] + context[1]) // 2
        case = Case("attention", f"paged decode, {B} seqs {context[0]}-{context[1]}, block {bs}",
                    (B, H, Hkv, D), dt, make, _oracle, 2 * B * Hkv * mean * D * es, impls,
                    memory=True)  # fmt: skip
        case.tokens = B  # one new token per sequence
        case.peak_gflops = opts.peak_gflops.get(DTYPE_NAMES.get(dt, ""), math.nan)
        cases.append(case)
    return cases
