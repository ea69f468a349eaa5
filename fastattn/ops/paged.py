"""Attention against a paged KV cache (FlashAttention's ``flash_attn_with_kvcache`` with a
``block_table``; vLLM / FlashInfer's layout): the keys and values of sequence b live in fixed-size
blocks ``k_cache[block_table[b, i]]``, ``cache_seqlens[b]`` of them filled. Forward only
(serving). Decode (a few new queries per sequence) and chunked prefill; the new keys/values
(``k_new``, ``v_new``) are appended in place at each sequence's current length first.

The op ``fastattn::paged_attention`` reads the lengths and the block table inside itself (a
``torch.compile`` graph needs no host integer), checks them before touching the cache, appends,
then attends. On the ``cpu`` and ``cuda`` backends one C++ call does all three for the whole
batch (``fastattn::paged_attention_forward``: csrc/paged.cpp, csrc/cuda/paged_host.cpp): the
attention kernels walk the block table themselves, reading each key where it lies, split over
the keys for long contexts. The ``triton`` backend's kernel walks it too
(fastattn/ops/paged_triton.py). The ``reference`` backend gathers each sequence's keys out of
their blocks and runs the dense kernel per sequence: exact, at the cost of that copy.
"""

from __future__ import annotations

import torch

from fastattn import _checks, dispatch
from fastattn.ops import attention as _attn
from fastattn.ops import opcall
from fastattn.ops.paged_triton import paged_forward

__all__ = ["paged_attention"]


def _seq_kv(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` tokens of one sequence's blocks, ``(n, kv_heads, head_dim)``: whole
    blocks gathered (one contiguous copy each), then a view of their first n rows."""
    bs = cache.shape[1]
    blocks = cache.index_select(0, table[: -(-n // bs)].long())  # (blocks, bs, Hkv, D)
    return blocks.view(-1, *cache.shape[2:])[:n]


def _check_tables(block_table, cache_seqlens, new: int, bs: int, nblocks: int) -> None:
    """Every sequence's ``cache_seqlens + new`` keys fit its row of the block table and name
    blocks of the cache: vectorised, one host sync; the first offender is named."""
    n = cache_seqlens.long() + new
    need = (n + bs - 1).div(bs, rounding_mode="floor")  # blocks each sequence's keys fill
    mb = block_table.shape[1]
    used = torch.arange(mb, device=n.device) < need[:, None]  # (B, max_blocks)
    bad_len = (cache_seqlens < 0) | (need > mb)
    bad_blk = used & ((block_table < 0) | (block_table >= nblocks))
    if not bool((bad_len | bad_blk.any(1)).any()):
        return
    b = int((bad_len | bad_blk.any(1)).nonzero()[0, 0])
    if bool(bad_len[b]):
        raise _checks.ShapeError(
            f"fastattn.paged_attention: sequence {b} holds {int(n[b]) - new} + {new} new tokens, "
            f"which need {int(need[b])} blocks of {bs}; block_table has {mb} per sequence"
            + (" (and a length must be >= 0)" if int(cache_seqlens[b]) < 0 else "")
        )
    ids = block_table[b][bad_blk[b]].tolist()
    raise _checks.ShapeError(
        f"fastattn.paged_attention: block_table[{b}] names blocks {ids[:4]} outside the "
        f"cache's {nblocks}"
    )


def _append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new) -> None:
    """Writes k_new / v_new ``(batch, new, kv_heads, head_dim)`` at positions
    ``cache_seqlens[b] ..`` of each sequence: one indexed write per cache for the batch."""
    bs = k_cache.shape[1]
    pos = cache_seqlens.long()[:, None] + torch.arange(k_new.shape[1], device=k_new.device)
    blk = block_table.long().gather(1, pos.div(bs, rounding_mode="floor"))  # (B, new)
    k_cache[blk, pos % bs] = k_new
    v_cache[blk, pos % bs] = v_new


@torch.library.custom_op("fastattn::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: torch.Tensor | None,
    alibi: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``(batch, seqlen_q, heads, head_dim_v)``, lse ``(batch, heads, seqlen_q)``."""
    if backend in ("cpu", "cuda"):  # one C++ call: checks, append, kernels walking the table
        return torch.ops.fastattn.paged_attention_forward(
            q.transpose(1, 2), k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, scale,
            causal, window_left, window_right, softcap, sinks, alibi,
        )  # fmt: skip
    B, Sq, H, _ = q.shape
    new = 0 if k_new is None else k_new.shape[1]
    _check_tables(block_table, cache_seqlens, new, k_cache.shape[1], k_cache.shape[0])
    if k_new is not None and v_new is not None and new:
        _append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new)
    seqlens_k = cache_seqlens + new  # int32 (B,): the keys each sequence's queries see
    if backend == "triton":  # one kernel walks the block tables (paged_triton.py)
        return paged_forward(q, k_cache, v_cache, block_table, seqlens_k, scale, causal,
                             window_left, window_right, softcap, sinks, alibi)  # fmt: skip
    # Elsewhere (the reference): each sequence's keys gathered out of their blocks, then the
    # dense kernel.
    out = opcall.new_output(q.new_empty((B, Sq, H, v_cache.shape[-1])))
    lse = q.new_empty((B, H, Sq), dtype=_attn.lse_dtype(q))
    for b, nk in enumerate(seqlens_k.tolist()):
        k = _seq_kv(k_cache, block_table[b], nk).transpose(0, 1)[None]  # (1, Hkv, nk, D)
        v = _seq_kv(v_cache, block_table[b], nk).transpose(0, 1)[None]
        qb = q[b].transpose(0, 1)[None]  # (1, H, Sq, D)
        al = None if alibi is None else alibi[b : b + 1]
        args = (qb, k, v, None, None, scale, causal, nk - Sq, 0.0, window_left, window_right,
                softcap, sinks, al)  # fmt: skip
        o, s = _attn.run_forward(backend, args)
        out[b] = o[0].transpose(0, 1)
        lse[b] = s[0]
    return out, lse


@paged_attention_op.register_fake
def _(q, k_cache, v_cache, *_):
    B, Sq, H, _ = q.shape
    out = q.new_empty((B, Sq, H, v_cache.shape[-1]))
    return out, q.new_empty((B, H, Sq), dtype=_attn.lse_dtype(q))


_PAGED_CPP = dispatch.cpp_kernels("paged_attention_forward")  # {"cpu"} (+ "cuda" in a CUDA build)
if _PAGED_CPP:

    @torch.library.register_fake("fastattn::paged_attention_forward")
    def _(q, k_cache, v_cache, *_):
        B, H, Sq, _ = q.shape  # q as the kernel takes it: (B, H, Sq, D)
        out = q.new_empty((B, Sq, H, v_cache.shape[-1]))
        return out, q.new_empty((B, H, Sq), dtype=_attn.lse_dtype(q))


def _check(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new) -> None:
    """Shapes, dtypes and devices, before allocating (lengths and block ids: inside the op)."""
    P = "fastattn.paged_attention"
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise _checks.ShapeError(
            f"{P}: q must be (batch, seqlen_q, heads, head_dim) and the caches (num_blocks, "
            f"block_size, kv_heads, head_dim); got q {tuple(q.shape)}, k_cache "
            f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, _, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    if k_cache.shape[3] != D or v_cache.shape[:3] != k_cache.shape[:3]:
        raise _checks.ShapeError(
            f"{P}: k_cache (num_blocks, block_size, kv_heads, head_dim) must match q's head_dim "
            f"and v_cache's first three dims; got q {tuple(q.shape)}, k_cache "
            f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if bs < 16 or bs & (bs - 1):
        raise _checks.ShapeError(f"{P}: block_size must be a power of two >= 16, got {bs}")
    if Hkv == 0 or H % Hkv:
        raise _checks.ShapeError(f"{P}: heads ({H}) must be a multiple of kv_heads ({Hkv})")
    if not q.is_floating_point() or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"{P}: q and the caches must share one floating dtype, got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    for name, t, shape in (
        ("block_table", block_table, None),
        ("cache_seqlens", cache_seqlens, (B,)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{P}: {name} must be an int32 tensor, got {getattr(t, 'dtype', t)}")
        if (shape is None and (t.dim() != 2 or t.shape[0] != B)) or (shape and t.shape != shape):
            want = f"(batch={B}, max_blocks)" if shape is None else f"(batch={B},)"
            raise _checks.ShapeError(f"{P}: {name} must be {want}, got {tuple(t.shape)}")
    if (k_new is None) != (v_new is None):
        raise _checks.ShapeError(f"{P}: k_new and v_new come together")
    if k_new is not None and v_new is not None:
        if k_new.shape != (B, q.shape[1], Hkv, D) or v_new.shape != (
            *k_new.shape[:3],
            v_cache.shape[3],
        ):
            raise _checks.ShapeError(
                f"{P}: k_new / v_new must be (batch, seqlen_q, kv_heads, head_dim) = "
                f"{(B, q.shape[1], Hkv, D)}; got {tuple(k_new.shape)}, {tuple(v_new.shape)}"
            )
        if k_new.dtype != q.dtype or v_new.dtype != q.dtype:
            raise TypeError(
                f"{P}: k_new / v_new must be {q.dtype}, got {k_new.dtype}, {v_new.dtype}"
            )
    named = {"k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
             "cache_seqlens": cache_seqlens, "k_new": k_new, "v_new": v_new}  # fmt: skip
    for name, t in named.items():
        if t is not None and t.device != q.device:
            raise _checks.ShapeError(f"{P}: {name} is on {t.device} but q is on {q.device}")
    if any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k_new, v_new)):
        raise RuntimeError(f"{P} is forward-only (serving): pass tensors that need no gradient")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``(batch, seqlen_q, heads, head_dim)`` against a paged KV cache
    (FlashAttention's ``flash_attn_with_kvcache`` with ``block_table``). Forward only.

    Args:
        k_cache, v_cache: ``(num_blocks, block_size, kv_heads, head_dim)`` (v: ``head_dim_v``);
            ``block_size`` a power of two >= 16; ``heads`` a multiple of ``kv_heads``.
        block_table: int32 ``(batch, max_blocks)``: sequence b's i-th block of keys is
            ``k_cache[block_table[b, i]]``.
        cache_seqlens: int32 ``(batch,)``: the tokens each sequence holds before this call.
        k_new, v_new: ``(batch, seqlen_q, kv_heads, head_dim)``: written into the caches in
            place at positions ``cache_seqlens[b] ..`` first (the caller advances the lengths);
            the queries then attend to ``cache_seqlens[b] + seqlen_q`` keys.
        causal, window, softcap, sinks, alibi_slopes, scale: as :func:`fastattn.attention`,
            aligned bottom-right (the queries are the last positions). ``alibi_slopes``
            ``(heads,)`` or ``(batch, heads)``.
        return_lse: also return the log-sum-exp ``(batch, heads, seqlen_q)``.

    Returns ``out`` ``(batch, seqlen_q, heads, head_dim_v)``. A sequence with no key gives
    zeros. Lengths and block ids are checked before the cache is read or written.
    """
    for name, value in (("scale", scale), ("softcap", softcap)):
        _checks.number("paged_attention", name, value)
    _check(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new)
    B, _, H, D = q.shape
    _attn.check_variants(q.new_empty((B, H, 0, D)), window, softcap, sinks, alibi_slopes)
    wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal and window is not None:
        wr = 0
    name = dispatch.select(backend, q.device, q.dtype, "paged_attention", _PAGED_CPP)
    opm = _attn.lse_dtype(q)
    sk = None if sinks is None else sinks.detach().to(opm).contiguous()  # the kernels: (H,)
    al = None if alibi_slopes is None else alibi_slopes.detach().to(opm).expand(B, H)
    sc = D**-0.5 if scale is None else float(scale)
    if name in ("cpu", "cuda"):  # the C++ op itself (mutable schema, fake kernel): no Python op
        out, lse = torch.ops.fastattn.paged_attention_forward(
            q.transpose(1, 2), k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, sc,
            bool(causal), wl, wr, float(softcap), sk, al,
        )  # fmt: skip
    else:
        out, lse = torch.ops.fastattn.paged_attention(
            q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, sc, bool(causal), wl,
            wr, float(softcap), sk, al, name,
        )  # fmt: skip
    return (out, lse) if return_lse else out
