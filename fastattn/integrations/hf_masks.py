"""transformers' attention masks in the structured form fastattn's kernels take.

transformers describes a mask by a *mask function* ``f(batch, head, q_idx, kv_idx) -> bool``
(``masking_utils``), which its SDPA mask function expands into a dense ``(batch, 1, seqlen_q,
seqlen_k)`` bool tensor. Where that function is one of its plain patterns, causal or
bidirectional, with or without its sliding-window overlay, the dense mask is only a key-padding
mask combined with the kernel's own ``causal`` and ``window``: :func:`pattern_of` recognises
those patterns (by the code objects of transformers' own factories, so any other function,
composed or custom, is left to the dense path), :func:`key_padding` gives the ``(batch,
seqlen_k)`` padding of the keys, and :func:`dense` expands a pattern as transformers does (the
tests hold it equal to transformers' ``sdpa_mask``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MaskPattern", "dense", "key_padding", "packed_pattern_of", "pattern_of"]


@dataclass(frozen=True)
class MaskPattern:
    """A mask function of transformers that is causal (``kv <= q``) or bidirectional, with an
    optional sliding window in transformers' terms: causal ``kv > q - window``, bidirectional
    ``|q - kv| <= window``."""

    causal: bool
    window: int | None = None

    def kernel_window(self) -> tuple[int, int] | None:
        """fastattn's ``window=(left, right)`` for this pattern (None: no window)."""
        if self.window is None:
            return None
        if self.causal:
            return (self.window - 1, 0)
        return (self.window, self.window)


@functools.cache
def _factories() -> dict[str, Any]:
    """The functions and closure code objects of transformers' mask factories (pinned version;
    tests/test_transformers_masks.py fails when one of them changes shape)."""
    from transformers import masking_utils as mu

    return {
        "causal": mu.causal_mask_function,
        "bidirectional": mu.bidirectional_mask_function,
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
        "bidirectional_sliding": mu.sliding_window_bidirectional_overlay(1).__code__,
        "packed": mu.packed_sequence_mask_function(torch.zeros(1, 1)).__code__,
        "remap": mu.remap_positions_for_packed_sequence(
            mu.causal_mask_function, torch.zeros(1, 1)
        ).__code__,
    }


def _cell(fn: Callable[..., Any], name: str) -> Any:
    """The value ``fn``'s closure holds for the free variable ``name``."""
    code = fn.__code__
    closure = fn.__closure__ or ()
    return closure[code.co_freevars.index(name)].cell_contents


def pattern_of(mask_function: Callable[..., Any] | None) -> MaskPattern | None:
    """The :class:`MaskPattern` of one of transformers' plain mask functions
    (``causal_mask_function``, ``bidirectional_mask_function``,
    ``sliding_window_causal_mask_function(w)``, ``sliding_window_bidirectional_mask_function(w)``),
    or None for any other function."""
    f = _factories()
    if mask_function is f["causal"] or mask_function is f["bidirectional"]:
        return MaskPattern(causal=mask_function is f["causal"])
    if getattr(mask_function, "__code__", None) is not f["and"]:
        return None
    assert mask_function is not None
    parts = tuple(_cell(mask_function, "mask_functions"))
    bases = [p for p in parts if p is f["causal"] or p is f["bidirectional"]]
    overlays = [p for p in parts if all(p is not b for b in bases)]
    if len(bases) != 1 or len(overlays) > 1:
        return None
    causal = bases[0] is f["causal"]
    if not overlays:
        return MaskPattern(causal)
    overlay = overlays[0]
    if (
        getattr(overlay, "__code__", None)
        is not f["sliding" if causal else "bidirectional_sliding"]
    ):
        return None
    window = _cell(overlay, "sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return None
    return MaskPattern(causal, window)


def packed_pattern_of(
    mask_function: Callable[..., Any] | None,
) -> tuple[MaskPattern, torch.Tensor] | None:
    """``(pattern, segments)`` of transformers' packed-sequence form of a plain mask function
    (``packed_sequence_compatibility_function``: tokens attend within their segment, with the
    pattern applied to their positions inside it), ``segments`` ``(batch, seqlen)`` the segment
    index of each token (a new segment where the position ids do not go up by one); else None."""
    f = _factories()
    if getattr(mask_function, "__code__", None) is not f["and"]:
        return None
    assert mask_function is not None
    parts = tuple(_cell(mask_function, "mask_functions"))
    codes = [getattr(p, "__code__", None) for p in parts]
    if len(parts) != 2 or codes[0] is not f["packed"] or codes[1] is not f["remap"]:
        return None
    pattern = pattern_of(_cell(parts[1], "mask_function"))
    segments = _cell(parts[0], "packed_sequence_mask")
    if pattern is None or not isinstance(segments, torch.Tensor) or segments.dim() != 2:
        return None
    return pattern, segments


def key_padding(
    attention_mask: torch.Tensor | None, kv_length: int, kv_offset: int
) -> torch.Tensor | None:
    """The ``(batch, kv_length)`` bool padding of the keys at positions ``kv_offset ..
    kv_offset + kv_length - 1`` from transformers' 2D ``attention_mask`` (``(batch, positions)``,
    nonzero = a token; positions past its end are padding, as in transformers' masks)."""
    if attention_mask is None:
        return None
    pad = attention_mask.bool()
    missing = kv_offset + kv_length - pad.shape[-1]
    if missing > 0:
        pad = torch.nn.functional.pad(pad, (0, missing))
    return pad[:, kv_offset : kv_offset + kv_length]


def dense(
    pattern: MaskPattern,
    padding: torch.Tensor | None,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
) -> torch.Tensor:
    """The dense ``(batch, 1, q_length, kv_length)`` bool mask (True = attend) of ``pattern`` and
    the key ``padding``, for queries at positions ``q_offset ..`` and keys at ``kv_offset ..``."""
    device = padding.device if padding is not None else None
    q = torch.arange(q_length, device=device)[:, None] + q_offset
    kv = torch.arange(kv_length, device=device)[None, :] + kv_offset
    keep = kv <= q if pattern.causal else torch.ones_like(q + kv, dtype=torch.bool)
    if pattern.window is not None:
        keep = keep & (
            kv > q - pattern.window if pattern.causal else (q - kv).abs() <= pattern.window
        )
    out = keep.expand(batch_size, 1, q_length, kv_length)
    if padding is not None:
        out = out & padding[:, None, None, :]
    return out
