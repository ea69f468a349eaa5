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

Which models: transformers accepts any registered name for every model, but only a model whose
attention goes through the ``AttentionInterface`` calls fastattn's attention; one with attention
code of its own (BLOOM, CodeGen, MPT, Falcon, ...) would still run that code and misread the
SDPA-style mask the ``"fastattn"`` mask function makes (``None`` for plain causal, a keep/drop
bool tensor). fastattn serves a model only where transformers itself would serve
``attn_implementation="sdpa"`` (``_supports_sdpa``) *and* its attention dispatches through the
interface (transformers' own test, ``_can_set_attn_implementation()``); any other model is
refused with :class:`UnsupportedModelError` — by ``apply()``, or at the first mask the model
builds when it was constructed with ``attn_implementation="fastattn"`` (before any attention
runs). :func:`unsupported_reason` says why for a given model or class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

import fastattn
from fastattn import patching
from fastattn.ops.attention import attention

NAME = "fastattn"


class UnsupportedModelError(ValueError):
    """A transformers model whose attention fastattn cannot serve (see :func:`unsupported_reason`);
    a ``ValueError``, as transformers' own refusal of ``attn_implementation="sdpa"``."""


def _classes(model: torch.nn.Module | type) -> list[type]:
    """The PreTrainedModel classes that make up ``model`` (itself and its sub-models), once each."""
    if isinstance(model, type):
        return [model]
    from transformers import PreTrainedModel

    seen: dict[type, None] = {}
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            seen.setdefault(type(m))
    return list(seen) or [type(model)]


def _class_reason(cls: type) -> str | None:
    name = cls.__name__
    # A model that flash-attention serves passes all it changes in the scores as the keyword
    # arguments fastattn reads too (sliding_window, softcap, s_aux): Gemma 2 and gpt-oss, which
    # SDPA cannot serve for their softcap / sinks.
    if not (getattr(cls, "_supports_sdpa", False) or getattr(cls, "_supports_flash_attn", False)):
        return (
            f"{name} supports neither transformers' SDPA nor its flash-attention path "
            "(`_supports_sdpa` and `_supports_flash_attn` are False): its attention is its own "
            "code, which fastattn's attention would not replace and which would misread the "
            "SDPA-style mask (None or a keep/drop bool tensor) that 'fastattn' makes"
        )
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return (
            f"{name}'s attention does not dispatch through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS): it picks its own eager/sdpa code by name, so under "
            "'fastattn' it would run its eager code with the SDPA-style mask 'fastattn' makes"
        )
    return None


def unsupported_reason(model: torch.nn.Module | type) -> str | None:
    """Why fastattn's attention cannot serve this transformers model (an instance, whose
    sub-models are checked too, or a ``PreTrainedModel`` class), or ``None`` when it can."""
    # The first part refused (the model itself, then its sub-models) names the reason.
    return next((r for r in map(_class_reason, _classes(model)) if r is not None), None)


def _refusal(reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"attn_implementation='fastattn' is not supported for this model: {reason}. Keep "
        "attn_implementation='eager' (or 'sdpa' where transformers supports it); "
        "fastattn.integrations.transformers.apply(model, attention=False) still swaps the norms."
    )


_CONFIG_VERDICT: dict[type, str | None] = {}
_SDPA_MASK: Callable[..., torch.Tensor | None] | None = None  # transformers' sdpa_mask
_COLLECTOR: Any = None  # transformers' output collector (set by register())


def _config_reason(config: Any) -> str | None:
    """:func:`unsupported_reason` of the model classes built on ``config``'s class (those defined
    beside it; any, for a config class borrowed by another package), cached per class."""
    cls = type(config)
    if cls in _CONFIG_VERDICT:
        return _CONFIG_VERDICT[cls]
    from transformers import PreTrainedModel

    users, todo = [], [PreTrainedModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if getattr(sub, "config_class", None) is cls:
                users.append(sub)
    package = cls.__module__.rpartition(".")[0]
    local = [u for u in users if u.__module__.rpartition(".")[0] == package]
    ordered = sorted(local or users, key=lambda u: (len(u.__name__), u.__name__))  # XModel first
    verdict = next((r for r in map(_class_reason, ordered) if r is not None), None)
    _CONFIG_VERDICT[cls] = verdict
    return verdict


def _check_config(config: Any) -> None:
    """Raises :class:`UnsupportedModelError` when ``config`` belongs to a model fastattn cannot
    serve (skipped while torch.compile traces: ``apply()`` and the first eager call check)."""
    if config is None or torch.compiler.is_compiling():
        return
    reason = _config_reason(config)
    if reason is not None:
        raise _refusal(reason)


def fastattn_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function registered as ``"fastattn"``: transformers' SDPA mask (bool, True =
    attend; ``None`` when the causal flag suffices), after checking that the model asking for it
    runs its attention through fastattn (a model with its own attention code is refused here,
    before its first attention runs)."""
    _check_config(kwargs.get("config"))
    assert _SDPA_MASK is not None  # set by register(), which registers this function
    return _SDPA_MASK(*args, **kwargs)


def _weights_requested(kwargs: dict[str, Any]) -> bool:
    """Whether this call's attention weights are wanted (``output_attentions=True``). Some models
    (GPT-2) do not pass the flag down to the attention function: transformers then records the
    weights through the output collector that its ``capture_outputs`` sets for the call, which is
    read here too (a private name of the pinned version; the architecture tests fail when it
    moves)."""
    if kwargs.get("output_attentions"):
        return True
    collected = None if _COLLECTOR is None else _COLLECTOR.get()
    return isinstance(collected, dict) and any(k.endswith("attentions") for k in collected)


def _warn_output_attentions() -> None:
    warnings.warn(
        "fastattn attention does not compute attention weights: with output_attentions=True this "
        "call runs an unfused (eager) attention that returns them",
        UserWarning,
        stacklevel=3,
    )


def _eager_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    scaling: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused attention that also returns the weights ``(batch, heads, seqlen_q, seqlen_k)``,
    with the masking of transformers' eager path (masked scores at the dtype's minimum)."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if causal:
        keep = torch.ones(query.shape[2], k.shape[2], dtype=torch.bool, device=query.device)
        mask = keep.tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:  # -inf (a bias hidden by the mask) as eager's minimum: no NaN rows
            scores = (scores + mask).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function protocol: q ``(batch, heads, seqlen_q, head_dim)``, k, v
    ``(batch, kv_heads, seqlen_k, head_dim)`` (GQA served natively); returns ``(out (batch,
    seqlen_q, heads, head_dim), None)``. Semantics are those of transformers' ``sdpa`` path,
    plus the keyword arguments of its flash-attention path: ``sliding_window`` (the kernel
    skips the key blocks outside it), ``softcap`` and ``s_aux`` (attention sinks), served in the
    kernel. v may have its own head_dim (latent attention). With ``output_attentions=True`` it
    warns and returns the weights of an unfused attention."""
    _check_config(getattr(module, "config", None))
    if kwargs.get("cache") is not None and not isinstance(kwargs["cache"], bool):
        raise ValueError("fastattn attention does not support paged caches")
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux", kwargs.get("sinks"))
    module_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and module_causal)
    window = _window(kwargs.get("sliding_window"), bool(module_causal), query, key, attention_mask)
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
    if _weights_requested(kwargs):
        if softcap is not None or sinks is not None or window is not None:
            raise ValueError(
                "fastattn attention: output_attentions=True is not served with softcap, "
                "attention sinks or a sliding window; use attn_implementation='eager'"
            )
        _warn_output_attentions()
        return _eager_with_weights(query, key, value, mask, causal, dropout, scaling)
    # transformers' causal flag is SDPA's (top-left): with an empty static cache the keys past
    # the queries are then hidden, as its sdpa path gets by cropping them.
    out = attention(query, key, value, causal="top_left" if causal else False, scale=scaling,
                    attn_mask=mask, dropout_p=dropout, window=window,
                    softcap=0.0 if softcap is None else float(softcap), sinks=sinks)  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return out.transpose(1, 2).contiguous(), None


def _window(
    sliding_window: int | None,
    module_causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[int, int] | None:
    """fastattn's ``window`` for transformers' ``sliding_window`` (its masks: causal ``kv > q -
    sw``, bidirectional ``|q - kv| < sw``), or None where it cannot be placed safely.

    The kernel places a window by the indices of the query and key tensors (queries are the
    last ``seqlen_q`` keys); transformers' mask, by the cache positions. They agree when there
    is no mask (transformers found every key visible) or when queries and keys are the same
    positions (``seqlen_q == seqlen_k``: a prefill, an encoder). Elsewhere (decoding with a
    static cache, whose keys include unwritten slots) the mask alone applies: right, but without
    skipping the blocks outside the window."""
    if sliding_window is None:
        return None
    if mask is not None and query.shape[2] != key.shape[2]:
        return None
    sw = int(sliding_window)
    return (sw - 1, 0 if module_causal else sw - 1)


def register() -> None:
    """Makes ``attn_implementation="fastattn"`` available (idempotent)."""
    global _SDPA_MASK, _COLLECTOR
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    try:
        from transformers.utils.output_capturing import _active_collector as _COLLECTOR
    except ImportError:  # pragma: no cover - another transformers: the flag alone is read
        _COLLECTOR = None
    _SDPA_MASK = sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    # The mask SDPA gets (bool, True = attend; None when plain causal suffices), behind the check.
    AttentionMaskInterface.register(NAME, fastattn_mask)


def _configs(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(path, config)`` of the model's config, its sub-configs and its sub-models' configs."""
    from transformers import PreTrainedModel

    found: dict[int, tuple[str, Any]] = {}
    todo: list[tuple[str, Any]] = [
        (n, m.config) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)
    ]
    while todo:
        path, cfg = todo.pop()
        if cfg is None or id(cfg) in found:
            continue
        found[id(cfg)] = (path, cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            todo.append((f"{path}.config.{key}".lstrip("."), getattr(cfg, key, None)))
    return list(found.values())


def apply(
    model: torch.nn.Module, norms: bool = True, attention: bool = True
) -> patching.PatchReport:
    """Switches a built transformers model to fastattn attention (``attention``) and (``norms``)
    swaps its norm modules in place; returns what was replaced and what was left, and why.
    Raises :class:`UnsupportedModelError` (before changing anything) for a model whose attention
    fastattn cannot serve; ``attention=False`` then swaps only the norms."""
    register()
    report = patching.PatchReport()
    if not attention:
        pass
    elif not hasattr(model, "set_attn_implementation"):
        report.left.append(("", type(model).__name__, "not a transformers PreTrainedModel"))
    else:
        reason = unsupported_reason(model)
        if reason is not None:
            raise _refusal(reason)
        model.set_attn_implementation(NAME)  # type: ignore[operator]
        # Replaced only where transformers really switched: every config the model's attention
        # modules read (the model's, its sub-models' and sub-configs') must now say "fastattn".
        kept = [(p, c._attn_implementation) for p, c in _configs(model)
                if c._attn_implementation != NAME]  # fmt: skip
        if kept:
            raise UnsupportedModelError(
                f"transformers kept {type(model).__name__} on another attention: "
                + ", ".join(f"{p or 'config'}: {impl!r}" for p, impl in kept)
            )
        report.replaced.append(("", type(model).__name__, "attn_implementation='fastattn'"))
    if norms:
        sub = fastattn.patch(model, ops=("layer_norm", "rms_norm"))
        report.replaced += sub.replaced
        report.left += sub.left
    return report
