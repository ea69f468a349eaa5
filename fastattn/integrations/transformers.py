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
Continuous batching (``model.generate_batch``) runs on :func:`fastattn.paged_attention` over
transformers' paged cache: :mod:`fastattn.integrations.hf_paged`.

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
from fastattn.integrations import hf_eager, hf_masks, hf_packed, hf_paged
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


_CONFIG_CLASSES: dict[type, list[type]] = {}
_SDPA_MASK: Callable[..., torch.Tensor | None] | None = None  # transformers' sdpa_mask
_COLLECTOR: Any = None  # transformers' output collector (set by register())


def _config_classes(config: Any) -> list[type]:
    """The model classes built on ``config``'s class (those defined beside it; any, for a config
    class borrowed by another package), the base model first; cached per class."""
    cls = type(config)
    if cls in _CONFIG_CLASSES:
        return _CONFIG_CLASSES[cls]
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
    if ordered:  # (none yet: its modeling module is not imported; asked again later)
        _CONFIG_CLASSES[cls] = ordered
    return ordered


def _check_config(config: Any) -> None:
    """Raises :class:`UnsupportedModelError` when ``config`` belongs to a model fastattn cannot
    serve (skipped while torch.compile traces: ``apply()`` and the first eager call check)."""
    if config is None or torch.compiler.is_compiling():
        return
    reason = next((r for r in map(_class_reason, _config_classes(config)) if r is not None), None)
    if reason is not None:
        raise _refusal(reason)


def _key_padding_form(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    config: Any = None,
    device: Any = None,
    **_: Any,
) -> torch.Tensor | None | bool:
    """The structured form of the mask transformers asks for, or False where only the dense mask
    says it: ``None`` (no padding: the causal flag and window alone) or the ``(batch,
    seqlen_k)`` bool padding of the keys, to which :func:`attention_forward` adds the causal flag
    and window the attention module passes (transformers' flash-attention contract: its mask
    function gives the 2D padding mask alone, the module ``is_causal`` and ``sliding_window``).
    Only for a model that transformers' flash-attention path serves, a plain causal /
    bidirectional / sliding-window pattern (:func:`hf_masks.pattern_of`), and queries that are
    the last keys (a prefill, a chunked prefill or decoding on a dynamic cache; not a static
    cache's unwritten slots), outside torch.compile tracing (which keeps the dense mask)."""
    if torch.compiler.is_compiling() or config is None:
        return False
    if getattr(config, "is_causal", True) is False:  # transformers' bidirectional override
        return False
    classes = _config_classes(config)
    if not classes or not all(getattr(c, "_supports_flash_attn", False) for c in classes):
        return False
    packed = hf_masks.packed_pattern_of(mask_function)
    if packed is not None:  # documents packed in a row: their segment ids, int64 (B, S)
        plain = type(q_offset) is int and q_offset == 0 == kv_offset and q_length == kv_length
        return packed[1].long() if plain and attention_mask is None else False
    pattern = hf_masks.pattern_of(mask_function)
    ints = all(type(n) is int for n in (q_length, kv_length, q_offset, kv_offset))
    if pattern is None or not ints or q_offset + q_length != kv_offset + kv_length:
        return False
    padding = hf_masks.key_padding(attention_mask, kv_length, kv_offset)
    if padding is not None and bool(padding.all()):
        padding = None
    if padding is None and q_length not in (1, kv_length):
        # The causal flag of a mask-less call is aligned top-left (transformers' SDPA
        # semantics): a chunk of queries after earlier keys needs the key form to be aligned
        # bottom-right.
        padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    return padding


def fastattn_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function registered as ``"fastattn"``: the structured form of
    :func:`_key_padding_form` where it applies (no ``(batch, 1, seqlen_q, seqlen_k)`` mask is
    built), else transformers' SDPA mask (bool, True = attend; ``None`` when the causal flag
    suffices); after checking that the model asking for it runs its attention through fastattn
    (a model with its own attention code is refused here, before its first attention runs)."""
    _check_config(kwargs.get("config"))
    if not args:
        form = _key_padding_form(**kwargs)
        if form is not False:
            assert not isinstance(form, bool)
            return form
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
    kernel. v may have its own head_dim (latent attention). ``attention_mask`` is transformers'
    SDPA mask, or the ``(batch, seqlen_k)`` key padding of :func:`fastattn_mask`. With
    ``output_attentions=True`` it warns and runs the model's own eager attention (which returns
    the weights) on the equivalent mask."""
    _check_config(getattr(module, "config", None))
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux", kwargs.get("sinks"))
    module_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding = kwargs.get("sliding_window")
    cache = kwargs.get("cache")
    if cache is not None and not isinstance(cache, bool):
        if not hf_paged.is_paged_cache(cache):
            raise ValueError(f"fastattn attention: unknown cache object {type(cache).__name__}")
        # Continuous batching: the paged cache is read in place (its attention_mask is unused:
        # the sequences are in cu_seq_lens_q / cu_seq_lens_k).
        return hf_paged.paged_attention_forward(
            module, query, key, value, kwargs, scaling=scaling, causal=bool(module_causal),
            window=_window(sliding, bool(module_causal), query, key, None), softcap=softcap,
            sinks=sinks, dropout=dropout, position_bias=position_bias,
            weights_requested=_weights_requested(kwargs),
        )  # fmt: skip
    mask = attention_mask
    if (
        mask is not None
        and mask.ndim == 2
        and not (mask.dtype.is_floating_point or mask.dtype == torch.bool)
    ):
        # fastattn_mask's packed form: the segment ids of each row's documents.
        causal: bool | str = bool(module_causal)
        window = _window(sliding, bool(module_causal), query, key, None)
        if not _weights_requested(kwargs):
            packed = hf_packed.packed_attention(query, key, value, mask, bool(causal), window,
                                                scaling, dropout, softcap, sinks)  # fmt: skip
            return packed, None
        mask = mask[:, None, :, None] == mask[:, None, None, :]  # (B, 1, S, S): the documents
    elif mask is not None and mask.ndim == 2:
        # fastattn_mask's key-padding form: the queries are the last keys, and the module's
        # causal flag and window apply aligned bottom-right (the flash-attention contract).
        if mask.shape != (key.shape[0], key.shape[2]):
            raise ValueError(
                f"fastattn attention: a 2D attention_mask is the key padding (batch, seqlen_k) "
                f"= {(key.shape[0], key.shape[2])}; got {tuple(mask.shape)}"
            )
        mask = mask.bool()[:, None, None, :]  # (B, 1, 1, Sk)
        causal = bool(module_causal and query.shape[2] > 1)
        window = _window(sliding, bool(module_causal), query, key, None)
    else:
        # transformers' causal flag is SDPA's (top-left): with an empty static cache the keys
        # past the queries are then hidden, as its sdpa path gets by cropping them.
        causal = "top_left" if query.shape[2] > 1 and mask is None and module_causal else False
        window = _window(sliding, bool(module_causal), query, key, mask)
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
        _warn_output_attentions()
        eager = hf_eager.model_eager(module)
        if eager is not None and position_bias is None:  # the model's own weights
            eager_mask = hf_eager.additive_mask(
                mask, query.shape[2], key.shape[2], causal, window, query.dtype
            )
            return eager(
                module, query, key, value, eager_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        return hf_eager.attention_with_weights(
            query, key, value, mask, causal, dropout, scaling, window, softcap, sinks
        )
    out = attention(query, key, value, causal=causal, scale=scaling,
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
    hf_paged.register(NAME)  # continuous batching (generate_batch) keeps NAME
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
