"""Softmax benchmark cases (``fastattn-bench softmax``): plain, log, scale + additive bias,
scale + bool key padding, and forward+backward, against torch.softmax, the eager chain,
torch.compile of it and the onnxruntime / OpenVINO peers."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from fastattn.bench.framework import (
    Case,
    Fn,
    Impl,
    Inputs,
    Options,
    backend_label,
    call_with,
    compiled,
    fwd_bwd,
    randn,
    register,
)

__all__ = ["SCALE", "SOFTMAX_QUICK_SHAPES", "SOFTMAX_SHAPES", "softmax_cases"]

SOFTMAX_SHAPES: tuple[tuple[int, ...], ...] = ((1024, 4096), (32, 131072))
SOFTMAX_QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((64, 1024), (4, 32768))
SCALE = 0.125  # 1/sqrt(head_dim 64)


def _bias_chain(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x * SCALE + bias, dim=-1)


def _keypad_chain(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.softmax((x * SCALE).masked_fill(~keep, float("-inf")), dim=-1)


def _x_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    return {"x": randn(shape, dt, dev, seed=0)}


def _bias_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    """An additive float mask (1, C) broadcast over rows, as an attention bias."""
    return {"x": randn(shape, dt, dev, seed=0), "bias": randn((1, shape[-1]), dt, dev, seed=1)}


def _keypad_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    """x (B, L, C) and a bool key-padding mask (B, 1, C): batch b keeps its first len_b keys."""
    b, _, c = shape
    lengths = torch.randint(c // 2, c + 1, (b, 1, 1), generator=torch.Generator().manual_seed(2))
    return {"x": randn(shape, dt, dev, seed=0), "keep": (torch.arange(c) < lengths).to(dev)}


def _grad_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    return {"x": randn(shape, dt, dev, seed=0).requires_grad_(), "g": randn(shape, dt, dev, 3)}


def _ref_softmax(inp: Inputs) -> torch.Tensor:
    return torch.softmax(inp["x"].detach().double(), dim=-1)


def _ref_log_softmax(inp: Inputs) -> torch.Tensor:
    return torch.log_softmax(inp["x"].double(), dim=-1)


def _ref_bias(inp: Inputs) -> torch.Tensor:
    return torch.softmax(inp["x"].double() * SCALE + inp["bias"].double(), dim=-1)


def _ref_keypad(inp: Inputs) -> torch.Tensor:
    z = (inp["x"].double() * SCALE).masked_fill(~inp["keep"], float("-inf"))
    return torch.softmax(z, dim=-1)


def _ref_softmax_bwd(inp: Inputs) -> torch.Tensor:
    y, g = _ref_softmax(inp), inp["g"].double()
    return y * (g - (g * y).sum(-1, keepdim=True))


def _softmax_x(i: Inputs) -> torch.Tensor:
    return torch.softmax(i["x"], dim=-1)


@register("softmax")
def softmax_cases(opts: Options) -> list[Case]:
    """Plain, log, scale + additive bias, scale + bool key padding, and forward+backward."""
    import fastattn

    be = opts.backend
    cases: list[Case] = []

    def runtime_peers(log: bool, dt: torch.dtype) -> list[Impl]:
        from fastattn.bench import peers

        return peers.softmax_peers(log, dt, opts.device) if opts.runtimes else []

    for shape in opts.shapes or (SOFTMAX_QUICK_SHAPES if opts.quick else SOFTMAX_SHAPES):
        rows, cols = math.prod(shape[:-1]), shape[-1]
        n = rows * cols
        nb = math.gcd(rows, 8)  # key-padding batches: x seen as (nb, rows / nb, cols)
        pad_shape = (nb, rows // nb, cols)
        for dt in opts.dtypes:
            es = torch.empty((), dtype=dt).element_size()
            fa = backend_label("softmax", opts, dt)

            def case(
                variant: str,
                shp: tuple[int, ...],
                make: Callable[..., Inputs],
                ref: Fn,
                nbytes: int,
                impls: list[Impl],
                dt: torch.dtype = dt,
            ) -> None:
                inputs = functools.partial(make, shape=shp, dt=dt)
                cases.append(Case("softmax", variant, shp, dt, inputs, ref, nbytes, impls))

            def fast(mask: str | None = None, fa: str = fa, **kw: Any) -> Impl:
                def fn(i: Inputs) -> torch.Tensor:
                    m = None if mask is None else i[mask]
                    return fastattn.softmax(i["x"], mask=m, backend=be, **kw)

                return Impl(fa, fn, subject=True)

            plain = [fast(), Impl("torch.softmax", _softmax_x), *runtime_peers(False, dt)]
            case("softmax", shape, _x_inputs, _ref_softmax, 2 * n * es, plain)
            lg = [
                fast(log=True),
                Impl("torch.log_softmax", lambda i: torch.log_softmax(i["x"], -1)),
                *runtime_peers(True, dt),
            ]
            case("log_softmax", shape, _x_inputs, _ref_log_softmax, 2 * n * es, lg)
            bias = [
                fast("bias", scale=SCALE),
                Impl("eager chain", call_with(_bias_chain, "x", "bias")),
            ]
            pad = [
                fast("keep", scale=SCALE),
                Impl("eager chain", call_with(_keypad_chain, "x", "keep")),
            ]
            if opts.compile:
                cb, cp = compiled(_bias_chain), compiled(_keypad_chain)
                bias.append(Impl("torch.compile(chain)", call_with(cb, "x", "bias")))
                pad.append(Impl("torch.compile(chain)", call_with(cp, "x", "keep")))
            case("scale+bias(1,C)", shape, _bias_inputs, _ref_bias, 2 * n * es + cols * es, bias)
            pad_bytes = 2 * n * es + nb * cols  # the bool mask: one byte per (batch, key)
            case("scale+keypad(B,1,C)", pad_shape, _keypad_inputs, _ref_keypad, pad_bytes, pad)
            # Forward reads x and writes y; backward reads dy and y and writes dx.
            grad = [
                Impl(fa, fwd_bwd(lambda i: fastattn.softmax(i["x"], backend=be)), subject=True),
                Impl("torch.softmax", fwd_bwd(_softmax_x)),
            ]
            case("softmax fwd+bwd", shape, _grad_inputs, _ref_softmax_bwd, 5 * n * es, grad)
    return cases
