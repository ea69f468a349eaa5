"""Attention variant cases of ``fastattn-bench attention`` (issue 15): a sliding window against
the full causal kernel and SDPA given the equivalent dense mask (also through transformers' mask
interface and attention functions, with padding); softcap, sinks and ALiBi against
the plain kernel (their cost), eager PyTorch and, where it can express them, SDPA."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

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
    fwd_bwd,
    oracle,
    randn,
)

__all__ = ["VARIANT_SHAPES", "WINDOW_SHAPES", "variant_cases"]

# (batch, heads, seqlen, head_dim, window): causal sliding window (left keys, right 0).
WINDOW_SHAPES = ((1, 8, 16384, 64, 1024),)
WINDOW_QUICK = ((1, 2, 512, 32, 64),)
# (batch, heads, seqlen, head_dim) of the softcap / sinks / ALiBi cases (causal).
VARIANT_SHAPES = ((1, 16, 2048, 64),)
VARIANT_QUICK = ((1, 2, 128, 32),)
SOFTCAP = 30.0  # Gemma 2's attention softcap
BASELINE_NOTE = "the plain kernel, a different result: the cost baseline"


def _inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype, grad: bool) -> Inputs:
    b, h, s, d = shape[:4]
    inp = {n: randn((b, h, s, d), dt, dev, i) for i, n in enumerate(("q", "k", "v"))}
    if grad:
        for t in inp.values():
            t.requires_grad_()
        inp["g"] = randn((b, h, s, d), dt, dev, 3)
    inp["sinks"] = randn((h,), torch.float32, dev, 4)
    inp["slopes"] = torch.rand(h, device=dev, generator=torch.Generator().manual_seed(5)) * 0.1
    return inp


def _windowed_reference(i: Inputs, left: int) -> torch.Tensor:
    """The oracle of a causal window, query chunk by chunk over only the keys the chunk sees
    (the dense float64 scores at 16384 would take 17 GB)."""
    from fastattn import reference

    q, k, v = i["q"], i["k"], i["v"]
    S, step = q.shape[2], 512
    outs = []
    for r0 in range(0, S, step):
        r1, k0 = min(S, r0 + step), max(0, r0 - left)
        pad = i["pad"][:, None, None, k0:r1] if "pad" in i else None  # (B, 1, 1, keys)
        o, _ = reference.attention(q[:, :, r0:r1], k[:, :, k0:r1], v[:, :, k0:r1], pad, None,
                                   True, r0 - k0, window=(left, 0))  # fmt: skip
        outs.append(o)
    return torch.cat(outs, dim=2)


def _window_cases(opts: Options, be: str) -> list[Case]:
    import fastattn

    cases = []
    for b, h, s, d, left in WINDOW_QUICK if opts.quick else WINDOW_SHAPES:
        shape = (b, h, s, d)
        for dt in opts.dtypes:

            def fast(i: Inputs, left: int = left) -> Out:
                out: Out = fastattn.attention(i["q"], i["k"], i["v"], causal=True,
                                              window=(left, 0), backend=be)  # fmt: skip
                return out

            def full(i: Inputs) -> Out:
                out: Out = fastattn.attention(i["q"], i["k"], i["v"], causal=True, backend=be)
                return out

            def sdpa_mask(i: Inputs, left: int = left, s: int = s) -> Out:
                # the dense (seqlen, seqlen) bool mask a window is otherwise given as
                n = torch.arange(s, device=i["q"].device)
                keep = (n.view(-1, 1) >= n.view(1, -1)) & (n.view(-1, 1) - n.view(1, -1) <= left)
                return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], attn_mask=keep)

            impls = [
                Impl(backend_label("attention", opts, dt), fast, subject=True),
                Impl("fastattn causal (no window)", full, inexact=BASELINE_NOTE),
                Impl("F.sdpa + dense window mask", sdpa_mask),
            ]
            es = torch.empty((), dtype=dt).element_size()
            make = functools.partial(_inputs, shape=shape, dt=dt, grad=False)
            ref = functools.partial(_windowed_reference, left=left)
            case = Case("attention", f"fwd causal window {left}", shape, dt, make, oracle(ref),
                        4 * b * h * s * d * es, impls)  # fmt: skip
            case.flops = 4 * b * h * s * min(s, left + 1) * d  # the keys each query sees
            case.peak_gflops = opts.peak_gflops.get(DTYPE_NAMES.get(dt, ""), math.nan)
            case.memory = True
            cases.append(case)
    return cases


HF_PADDING = 100  # right-padded keys of the transformers case (every row still sees a key)


def _hf_window_cases(opts: Options) -> list[Case]:
    """A Mistral-style sliding-window layer through transformers' mask interface and the
    registered attention, with key padding: fastattn's mask function (the key padding only)
    against fastattn and transformers' SDPA given transformers' dense mask. Mask construction
    is timed with the attention: it is what the dense form costs."""
    try:
        from transformers import MistralConfig, MistralModel  # noqa: F401 (the config's model)
        from transformers import masking_utils as mu
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # transformers is optional
        return []
    from fastattn.integrations import transformers as fa_hf

    fa_hf.register()
    layer = torch.nn.Module()
    layer.is_causal, layer.num_key_value_groups = True, 1  # type: ignore[assignment]
    cases = []
    for b, h, s, d, left in WINDOW_QUICK if opts.quick else WINDOW_SHAPES:
        cfg = MistralConfig(num_hidden_layers=1, sliding_window=left + 1)

        def mask(
            i: Inputs, build: Callable[..., torch.Tensor | None], s: int = s, cfg: Any = cfg
        ) -> torch.Tensor | None:
            w = cfg.sliding_window
            return build(batch_size=i["q"].shape[0], q_length=s, kv_length=s,
                         attention_mask=i["pad"], config=cfg, device=i["q"].device,
                         mask_function=mu.sliding_window_causal_mask_function(w),
                         allow_is_causal_skip=True)  # fmt: skip

        def ours(
            i: Inputs,
            dense: bool,
            mask: Callable[..., torch.Tensor | None] = mask,
            w: int = left + 1,
        ) -> Out:
            m = mask(i, mu.sdpa_mask if dense else fa_hf.fastattn_mask)
            out, _ = fa_hf.attention_forward(layer, i["q"], i["k"], i["v"], m, sliding_window=w)
            return out.transpose(1, 2)  # (B, H, S, D)

        def sdpa(i: Inputs, mask: Callable[..., torch.Tensor | None] = mask) -> Out:
            out, _ = sdpa_attention_forward(layer, i["q"], i["k"], i["v"], mask(i, mu.sdpa_mask))
            return out.transpose(1, 2)

        for dt in opts.dtypes:

            def make(dev: torch.device, s: int = s, shape: tuple = (b, h, s, d), dt=dt) -> Inputs:
                inp = _inputs(dev, shape, dt, grad=False)
                inp["pad"] = torch.ones(shape[0], s, dtype=torch.bool, device=dev)
                inp["pad"][:, s - HF_PADDING :] = False
                return inp

            impls = [
                Impl(f"{backend_label('attention', opts, dt)} via transformers (key padding)",
                     functools.partial(ours, dense=False), subject=True),
                Impl("fastattn via transformers' dense mask", functools.partial(ours, dense=True)),
                Impl("transformers sdpa (dense mask)", sdpa),
            ]  # fmt: skip
            es = torch.empty((), dtype=dt).element_size()
            ref = functools.partial(_windowed_reference, left=left)
            case = Case("attention", f"fwd HF sliding window {left + 1} + padding", (b, h, s, d),
                        dt, make, oracle(ref), 4 * b * h * s * d * es, impls)  # fmt: skip
            case.flops = 4 * b * h * s * min(s, left + 1) * d
            case.peak_gflops = opts.peak_gflops.get(DTYPE_NAMES.get(dt, ""), math.nan)
            case.memory = True
            cases.append(case)
    return cases


def _eager(i: Inputs, kind: str) -> torch.Tensor:
    """Eager PyTorch in the inputs' dtype: scores, the variant, causal mask, softmax, @ v."""
    q, k, v = i["q"], i["k"], i["v"]
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    S = s.shape[-1]
    n = torch.arange(S, device=q.device)
    if kind == "softcap":
        s = SOFTCAP * torch.tanh(s / SOFTCAP)
    if kind == "alibi":
        s = s - i["slopes"].to(s.dtype).view(-1, 1, 1) * (n.view(-1, 1) - n.view(1, -1)).abs()
    s = s.masked_fill(n.view(1, -1) > n.view(-1, 1), float("-inf"))
    if kind == "sinks":
        sk = i["sinks"].to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        return torch.softmax(torch.cat([s, sk], dim=-1), dim=-1)[..., :-1] @ v
    return torch.softmax(s, dim=-1) @ v


def _variant_kw(i: Inputs, kind: str) -> dict:
    if kind == "softcap":
        return {"softcap": SOFTCAP}
    if kind == "sinks":
        return {"sinks": i["sinks"]}
    return {"alibi_slopes": i["slopes"]}


def _variant_cases(opts: Options, be: str) -> list[Case]:
    import fastattn
    from fastattn import reference

    qkv = ("q", "k", "v")
    cases = []
    for shape in VARIANT_QUICK if opts.quick else VARIANT_SHAPES:
        b, h, s, d = shape
        for dt in opts.dtypes:
            for kind in ("softcap", "sinks", "alibi"):
                for bwd in (False, True):

                    def fast(i: Inputs, kind: str = kind) -> Out:
                        kw = _variant_kw(i, kind)
                        out: Out = fastattn.attention(i["q"], i["k"], i["v"], causal=True,
                                                      backend=be, **kw)  # fmt: skip
                        return out

                    def plain(i: Inputs) -> Out:
                        out: Out = fastattn.attention(i["q"], i["k"], i["v"], causal=True,
                                                      backend=be)  # fmt: skip
                        return out

                    def ref(i: Inputs, kind: str = kind) -> Out:
                        return reference.attention(i["q"], i["k"], i["v"], None, None, True, 0,
                                                   **_variant_kw(i, kind))[0]  # fmt: skip

                    impls = [
                        Impl(backend_label("attention", opts, dt), fast, subject=True),
                        Impl("fastattn plain causal", plain, inexact=BASELINE_NOTE),
                        Impl("eager", functools.partial(_eager, kind=kind)),
                    ]
                    if kind == "alibi":  # SDPA takes ALiBi as a dense float bias

                        def sdpa(i: Inputs, s: int = s) -> Out:
                            n = torch.arange(s, device=i["q"].device)
                            rel = (n.view(1, -1) - n.view(-1, 1)).to(i["q"].dtype)
                            bias = -i["slopes"].to(rel.dtype).view(-1, 1, 1) * rel.abs()
                            bias = bias.masked_fill(rel > 0, float("-inf"))
                            return F.scaled_dot_product_attention(i["q"], i["k"], i["v"],
                                                                  attn_mask=bias)  # fmt: skip

                        impls.append(Impl("F.sdpa + dense ALiBi bias", sdpa))
                    if bwd:
                        impls = [Impl(m.name, fwd_bwd(m.fn, qkv), m.subject, m.inexact)
                                 for m in impls]  # fmt: skip
                    es = torch.empty((), dtype=dt).element_size()
                    make = functools.partial(_inputs, shape=shape, dt=dt, grad=bwd)
                    variant = ("fwd+bwd" if bwd else "fwd") + f" causal {kind}"
                    case = Case("attention", variant, shape, dt, make,
                                oracle(ref, qkv if bwd else None),
                                (12 if bwd else 4) * b * h * s * d * es, impls)  # fmt: skip
                    case.flops = 2 * b * h * s * s * d * (7 if bwd else 2) // 2
                    case.peak_gflops = opts.peak_gflops.get(DTYPE_NAMES.get(dt, ""), math.nan)
                    case.memory = True
                    cases.append(case)
    return cases


def variant_cases(opts: Options) -> list[Case]:
    """The window cases, then softcap / sinks / ALiBi (see the module docstring)."""
    return (
        _window_cases(opts, opts.backend)
        + _hf_window_cases(opts)
        + _variant_cases(opts, opts.backend)
    )
