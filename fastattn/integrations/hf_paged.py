"""transformers' continuous batching (``model.generate_batch``, ``init_continuous_batching``) on
fastattn: its ``PagedAttentionCache`` read by :func:`fastattn.paged_attention`, in place.

What transformers passes (5.23): the batch's new tokens packed into one row, q ``(1, heads,
total_q, head_dim)``, k, v ``(1, kv_heads, total_q, head_dim)``, and in the keyword arguments
``cache`` (the ``PagedAttentionCache``), ``cu_seq_lens_q`` (int32 ``(batch + 1,)``),
``cu_seq_lens_k`` / ``max_length_k`` (one per layer type), ``read_index`` / ``write_index`` (one
int64 tensor of physical token rows per layer group: each sequence's keys, then the new tokens'
slots) and ``block_table`` (``None``: transformers builds one for flash-attention on CUDA only).

The layout: a full-attention layer's keys live in pages of ``page_size`` tokens, which the
cache's own ``get_cache_for_block_table(layer)`` returns as ``(num_pages, page_size, kv_heads,
head_dim)`` views of its storage (keys and values of each page side by side in one tensor) —
paged_attention's ``(num_blocks, block_size, kv_heads, head_dim)`` as they are, no copy. The
block table is read off ``read_index`` (the row of each page's first key, divided by the page
size); the new keys and values are written by the cache's own ``update`` (its write half: the
read index emptied, so it reads nothing back). Sliding-window layers keep a ring buffer whose
pages are not in position order (and transformers gives them no block view): they take the
cache's own read-back (a copy of each sequence's window) and :func:`fastattn.varlen_attention`.

The queries of a batch have different lengths (a prefill chunk beside one-token decodes):
paged_attention takes ``(batch, seqlen_q)``, so each sequence's queries are placed last in a row
of the longest one's length (causal alignment is bottom-right) and the rows before are dropped
from the output; a batch of equal lengths (pure decode) is a view, no copy.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fastattn.ops.paged import paged_attention
from fastattn.ops.varlen import varlen_attention

__all__ = ["is_paged_cache", "paged_attention_forward", "register"]

_SERVED: set[str] = set()  # attn_implementation names that continuous batching may keep


def is_paged_cache(cache: object) -> bool:
    """Whether ``cache`` is transformers' continuous-batching ``PagedAttentionCache``."""
    try:
        from transformers.generation.continuous_batching import PagedAttentionCache
    except ImportError:  # pragma: no cover - a transformers without continuous batching
        return False
    return isinstance(cache, PagedAttentionCache)


def register(name: str) -> None:
    """Lets continuous batching run a model whose ``attn_implementation`` is ``name``
    (idempotent). transformers 5.23 accepts only ``"paged|eager"``, ``"sdpa"`` and flash names
    there (and strips a ``"paged|"`` prefix from any other name), switching or refusing the rest;
    its manager's ``switch_to_cb_friendly_attn`` is wrapped to keep ``name`` as it is."""
    _SERVED.add(name)
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager
    except ImportError:  # pragma: no cover
        return
    original = ContinuousBatchingManager.switch_to_cb_friendly_attn
    if getattr(original, "_fastattn", False):
        return

    @functools.wraps(original)
    def switch(self: Any, model: Any, auto_switch_to_flash: bool = True) -> None:
        if getattr(model.config, "_attn_implementation", None) in _SERVED:
            return None  # served as it is: fastattn reads the paged cache itself
        return original(self, model, auto_switch_to_flash)

    switch._fastattn = True  # type: ignore[attr-defined]
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch  # type: ignore[method-assign]


_P = "fastattn attention on transformers' paged cache (continuous batching)"


def _refuse(dropout: float, position_bias: torch.Tensor | None, weights: bool) -> None:
    if dropout:
        raise ValueError(f"{_P} is inference-only: dropout must be 0, got {dropout}")
    if position_bias is not None:
        raise ValueError(f"{_P} takes no additive position_bias (T5-style relative attention)")
    if weights:
        raise ValueError(f"{_P} does not return attention weights (output_attentions=True)")


def _rows(cu_q: list[int], device: torch.device) -> tuple[torch.Tensor | None, int]:
    """The row of each real query in the ``(batch * max_q)`` padded queries (each sequence's
    queries last in its row), or None where every sequence has ``max_q`` of them; and max_q."""
    lens = [b - a for a, b in zip(cu_q[:-1], cu_q[1:], strict=True)]
    max_q = max(lens, default=0)
    if all(n == max_q for n in lens):
        return None, max_q
    n = torch.tensor(lens, device=device)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=device), n, output_size=cu_q[-1])
    start = torch.tensor(cu_q[:-1], device=device)  # row b's real queries: b*max_q + max_q - n_b..
    shift = torch.arange(len(lens), device=device) * max_q + max_q - n - start
    return torch.arange(cu_q[-1], device=device) + shift[seq], max_q


def _block_table(rows: torch.Tensor, cu_k: torch.Tensor, max_k: int, page: int) -> torch.Tensor:
    """int32 ``(batch, ceil(max_k / page))``: the page of each sequence's i-th ``page`` keys,
    read off the physical row of its first key (entries past a sequence's length are unread)."""
    n = max(1, -(-max_k // page))
    first = cu_k[:-1].long()[:, None] + torch.arange(n, device=rows.device)[None] * page
    table = (rows[first.clamp_(max=rows.numel() - 1)] // page).to(torch.int32)
    # The table holds only if every key sits at its page's row (pages read in row order, from
    # their start): checked over all keys, so a layout transformers might use otherwise is
    # refused instead of misread.
    lens = (cu_k[1:] - cu_k[:-1]).long()
    total = int(cu_k[-1])
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=rows.device), lens,
                                  output_size=total)  # fmt: skip
    t = torch.arange(total, device=rows.device) - cu_k[:-1].long()[seq]
    want = table[seq, t // page].long() * page + t % page
    if not torch.equal(rows[:total].long(), want):
        raise ValueError(
            f"{_P}: the cache's rows of a sequence are not its pages' rows in order (page_size "
            f"{page}); this transformers version lays out its paged cache in a way fastattn "
            "cannot read in place"
        )
    return table


def _paged_layer(
    cache: Any, allocator: Any, layer: int, key: torch.Tensor, value: torch.Tensor,
    q: torch.Tensor, cu_q: list[int], kwargs: dict[str, Any], attn: dict[str, Any],
) -> torch.Tensor:  # fmt: skip
    """A full-attention layer: the cache writes the new keys, paged_attention reads its pages
    in place. q ``(T, heads, head_dim)``; returns ``(cu_q[-1], heads, head_dim_v)``."""
    k_pages, v_pages = allocator.get_cache_for_block_table(layer)  # (pages, page, Hkv, D) views
    page = k_pages.shape[1]
    if page < 16 or page & (page - 1):
        raise ValueError(
            f"{_P}: the cache's page_size is {page}; fastattn.paged_attention needs a power of "
            "two >= 16 (ContinuousBatchingConfig(page_size=...), transformers' default is 256)"
        )
    kw = dict(kwargs, read_index=[r[:0] for r in kwargs["read_index"]])  # its write half only
    cache.update(key_states=key, value_states=value, layer_idx=layer, kwargs=kw)
    read = kwargs["read_index"][allocator.index]
    rows = read if read.numel() else kwargs["write_index"][allocator.index]  # no past: the new
    cu_k = kw["cu_seq_lens_k"]  # (this layer type's, selected by the update)
    table = _block_table(rows, cu_k, int(kw["max_length_k"]), page)
    lens = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    dest, max_q = _rows(cu_q, q.device)
    B, (_, H, D), n = len(cu_q) - 1, q.shape, cu_q[-1]
    if dest is None:
        qp = q[:n].reshape(B, max_q, H, D)  # (B, Sq, H, D)
    else:
        qp = q.new_zeros(B * max_q, H, D).index_copy_(0, dest, q[:n])
        qp = qp.view(B, max_q, H, D)  # (B, Sq, H, D): each sequence's queries last in its row
    out = paged_attention(qp, k_pages, v_pages, table, lens, **attn)
    assert isinstance(out, torch.Tensor)
    flat = out.view(B * max_q, H, out.shape[-1])  # (B * Sq, H, Dv)
    return flat if dest is None else flat.index_select(0, dest)


def _window_layer(
    cache: Any, layer: int, key: torch.Tensor, value: torch.Tensor, q: torch.Tensor,
    cu_q: list[int], kwargs: dict[str, Any], attn: dict[str, Any],
) -> torch.Tensor:  # fmt: skip
    """A sliding-window layer (a ring buffer, no block view): the cache's own read-back of each
    window and the new tokens, then varlen_attention. Returns ``(cu_q[-1], heads, head_dim_v)``."""
    kw = dict(kwargs)
    k_all, v_all = cache.update(key_states=key, value_states=value, layer_idx=layer, kwargs=kw)
    cu_k = kw["cu_seq_lens_k"].to(torch.int32)
    nk = int(cu_k[-1])
    k = k_all[0].transpose(0, 1)[:nk]  # (total_k, Hkv, D)
    v = v_all[0].transpose(0, 1)[:nk]
    cq = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
    out = varlen_attention(q[: cu_q[-1]], k, v, cq, cu_k, **attn)
    assert isinstance(out, torch.Tensor)
    return out


@torch.compiler.disable  # the cache is written in place through views of one storage tensor
def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: dict[str, Any],
    *,
    scaling: float | None,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    weights_requested: bool = False,
) -> tuple[torch.Tensor, None]:
    """One layer of a continuous batch: q ``(1, heads, total_q, head_dim)``, k, v ``(1,
    kv_heads, total_q, head_dim)`` (the new tokens of every sequence, packed); ``kwargs`` the
    attention function's keyword arguments (``cache``, ``cu_seq_lens_q``, ...: not changed).
    Writes k, v into ``kwargs["cache"]``; returns ``(out (1, total_q, heads, head_dim_v),
    None)``. ``window`` is fastattn's ``(left, right)``, ``sinks`` ``(heads,)``."""
    _refuse(dropout, position_bias, weights_requested)
    cache, layer = kwargs["cache"], int(getattr(module, "layer_idx"))  # noqa: B009
    allocator = cache.layer_to_allocator[layer]
    q = query[0].transpose(0, 1)  # (T, H, D)
    cu_q = [int(x) for x in kwargs["cu_seq_lens_q"].tolist()]
    attn = dict(causal=causal, window=window, softcap=0.0 if softcap is None else float(softcap),
                sinks=sinks, scale=scaling)  # fmt: skip
    if allocator.supports_block_table:
        o = _paged_layer(cache, allocator, layer, key, value, q, cu_q, kwargs, attn)
    else:
        o = _window_layer(cache, layer, key, value, q, cu_q, kwargs, attn)
    if cu_q[-1] < q.shape[0]:  # a padded batch (static shapes): the padding tokens get zeros
        o = torch.cat([o, o.new_zeros(q.shape[0] - cu_q[-1], *o.shape[1:])])
    return o[None], None
