"""HuggingFace transformers on fastattn kernels.

    from fastattn.integrations import transformers as fa_hf
    fa_hf.register()                                   # attn_implementation="fastattn" works
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")
    report = fa_hf.apply(model)                        # or: attention + norms of a built model

``register`` adds the attention function to transformers' ``AttentionInterface`` *and* a mask
function to ``AttentionMaskInterface`` — without the latter, transformers passes no mask to a
custom attention and padding would silently vanish. ``apply`` also swaps the norm modules:
``nn.LayerNorm`` and Llama-style RMSNorm classes, recognised by their structure and verified on a
probe input before they are swapped (a variant such as Gemma's ``x * (1 + w)`` is left alone).
"""

from __future__ import annotations

from typing import Any

import torch

import fastattn
from fastattn import patching
from fastattn.ops.attention import attention

NAME = "fastattn"


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function protocol: q ``(batch, heads, seqlen_q, head_dim)``, k, v
    ``(batch, kv_heads, seqlen_k, head_dim)`` (GQA served natively); returns ``(out (batch,
    seqlen_q, heads, head_dim), None)``. Semantics are those of transformers' ``sdpa`` path."""
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"fastattn attention does not support `{unsupported}`")
    if kwargs.get("cache") is not None and not isinstance(kwargs["cache"], bool):
        raise ValueError("fastattn attention does not support paged caches")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]]
    if position_bias is not None:  # an additive bias, hidden where the mask hides
        bias = position_bias[..., : key.shape[2]].to(torch.float32)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias + mask
    # transformers' causal flag is SDPA's (top-left): with an empty static cache the keys past
    # the queries are then hidden, as its sdpa path gets by cropping them.
    out = attention(query, key, value, causal="top_left" if causal else False, scale=scaling,
                    attn_mask=mask, dropout_p=dropout)  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes ``attn_implementation="fastattn"`` available (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    # The mask SDPA gets (bool, True = attend; None when plain causal suffices).
    AttentionMaskInterface.register(NAME, sdpa_mask)


def apply(model: torch.nn.Module, norms: bool = True) -> patching.PatchReport:
    """Switches a built transformers model to fastattn attention and (``norms``) swaps its norm
    modules in place; returns what was replaced and what was left, and why."""
    register()
    report = patching.PatchReport()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)  # type: ignore[operator]
        report.replaced.append(("", type(model).__name__, "attn_implementation='fastattn'"))
    else:
        report.left.append(("", type(model).__name__, "not a transformers PreTrainedModel"))
    if norms:
        sub = fastattn.patch(model, ops=("layer_norm", "rms_norm"))
        report.replaced += sub.replaced
        report.left += sub.left
    return report
