"""Documents packed into the rows of a transformers batch (position ids that restart, as
``DataCollatorWithFlattening`` makes them) served by :func:`fastattn.varlen_attention`: one
call, each document attending only within itself, no ``(batch, 1, seqlen, seqlen)`` mask."""

from __future__ import annotations

import torch

from fastattn.ops.varlen import varlen_attention

__all__ = ["cu_seqlens", "packed_attention"]


def cu_seqlens(segments: torch.Tensor) -> torch.Tensor:
    """int32 cumulative lengths of the documents of ``segments`` ``(batch, seqlen)`` (the
    segment id of each token; a document starts where it changes, and at each row's start),
    over the rows flattened one after another."""
    B, S = segments.shape
    starts = torch.ones(B, S, dtype=torch.bool, device=segments.device)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = starts.reshape(-1).nonzero().view(-1)  # (a host sync: eager calls only)
    return torch.cat([first, first.new_tensor([B * S])]).to(torch.int32)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: torch.Tensor,
    causal: bool,
    window: tuple[int, int] | None,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q ``(batch, heads, seqlen, head_dim)``, k, v ``(batch, kv_heads, seqlen, head_dim[_v])``
    of packed rows; returns ``(batch, seqlen, heads, head_dim_v)`` (transformers' layout)."""
    B, H, S, _ = query.shape
    if segments.shape != (B, S) or key.shape[2] != S:
        raise ValueError(
            f"fastattn attention: packed segment ids {tuple(segments.shape)} do not match "
            f"queries {tuple(query.shape)} and keys {tuple(key.shape)}"
        )
    cu = cu_seqlens(segments)
    q, k, v = (
        t.transpose(1, 2).reshape(B * S, t.shape[1], t.shape[3]) for t in (query, key, value)
    )
    out = varlen_attention(q, k, v, cu, cu, causal=causal, scale=scaling, dropout_p=dropout,
                           window=window, softcap=0.0 if softcap is None else float(softcap),
                           sinks=sinks)  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return out.view(B, S, H, value.shape[-1])
