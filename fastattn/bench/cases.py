"""Benchmark cases: inputs, the float64 oracle, the bytes moved, fastattn and its peers.

Shared by the ``fastattn-bench`` CLI and the pytest-benchmark suite (``benchmarks/``). To add an
op, write a builder ``def <op>_cases(opts: Options) -> list[Case]`` and decorate it with
``@register("<op>")``: the CLI's positional ``OPS`` and the default suite pick it up
(``@register("<op>", default=False)``: only when named, for ops too slow for ``make bench``).

Building cases is cheap (no tensors, no compilation): inputs are made by ``Case.make_inputs``
and ``torch.compile`` peers compile on their first call, which the runners exclude from timing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Inputs = dict[str, torch.Tensor]
Out = torch.Tensor | tuple[torch.Tensor, ...]  # one result, or several each checked on its own
Fn = Callable[[Inputs], Out]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Error bound of a result against the float64 oracle, per dtype: on every finite entry
# |out - ref| <= ATOL_REL * max|ref| + RTOL * |ref|, and NaN/±inf in the same places.
# The eager bf16 chain, which rounds x*scale and x*scale+mask to bf16, uses ~30% of the bf16
# bound on the default cases (1.5% relative error); a dropped mask or scale is far outside it.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


@dataclass(frozen=True)
class Options:
    """What the runner asked for; each builder turns it into its own cases."""

    quick: bool = False
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    device: str = "cpu"
    backend: str = "auto"
    shapes: tuple[tuple[int, ...], ...] | None = None  # overrides the builder's shapes
    compile: bool = True  # include torch.compile peers
    runtimes: bool = True  # include the onnxruntime / OpenVINO peers (forward only; peers.py)
    # GFLOP/s of this machine per dtype name, for the "% peak" column (the CLI measures it,
    # limits.py; --peak overrides it); without a figure the column is empty
    peak_gflops: dict[str, float] = field(default_factory=dict)


@dataclass
class Impl:
    """An implementation: ``fn(inputs)`` returns the tensor(s) checked against the oracle."""

    name: str
    fn: Fn
    subject: bool = False  # fastattn's own implementation; peers are compared with it
    # A peer whose result is known to exceed the tolerance, and why: its check is still run and
    # shown ("inexact" with the error), but does not fail the run. Never set on fastattn's own.
    inexact: str = ""


@dataclass
class Case:
    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], Inputs]
    reference: Fn  # float64 result on the same inputs
    nbytes: int  # bytes of the fused op: each input read once, each output written once
    impls: list[Impl] = field(default_factory=list)
    flops: int = 0  # arithmetic of the op (compute-bound ops): GFLOP/s and % of peak reported
    peak_gflops: float = math.nan  # the machine's peak for this dtype
    memory: bool = False  # also measure each impl's peak extra memory (one more, untimed call)
    tokens: int = 0  # tokens one call processes (model cases): tokens/s reported
    # Replaces ``compare`` as the check of each result (e.g. greedy tokens in low precision).
    check: Callable[[Out, Out, torch.dtype], Check] | None = None

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def dtype_str(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{self.shape_str}-{self.dtype_str}".replace(" ", "_")


@dataclass
class Check:
    """Outcome of comparing one result with the float64 oracle."""

    ok: bool
    max_err: float
    worst_ratio: float  # max over entries of error / bound; <= 1 passes
    message: str


def compare(out: Out, ref: Out, dtype: torch.dtype) -> Check:
    """Check ``out`` against the float64 ``ref`` with the tolerance of ``dtype``.

    A tuple (e.g. a fused op's two outputs, or the gradients of every input) is checked element
    by element, each against its own scale; the worst element decides.
    """
    if not isinstance(out, tuple) and not isinstance(ref, tuple):
        return _compare_one(out, ref, dtype)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if len(outs) != len(refs):
        return Check(False, math.inf, math.inf, f"{len(outs)} results, expected {len(refs)}")
    checks = [_compare_one(o, r, dtype) for o, r in zip(outs, refs, strict=True)]
    k = max(range(len(checks)), key=lambda j: (not checks[j].ok, checks[j].worst_ratio))
    worst = checks[k]
    head, _, rest = worst.message.partition(": ")
    msg = f"{head}: result #{k} of {len(checks)}: {rest}" if rest else worst.message
    return Check(worst.ok, max(c.max_err for c in checks), worst.worst_ratio, msg)


def _compare_one(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Check:
    if tuple(out.shape) != tuple(ref.shape):
        return Check(False, math.inf, math.inf, f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    o = out.detach().to(torch.float64)
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        if not torch.equal(test(o), test(ref)):
            n = int((test(o) != test(ref)).sum())
            return Check(False, math.inf, math.inf, f"{what} pattern differs at {n} entries")
    fin = torch.isfinite(ref)
    if not bool(fin.any()):
        return Check(True, 0.0, 0.0, "ok (no finite entries)")
    atol_rel, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    r = ref[fin]
    err = (o[fin] - r).abs()
    bound = atol_rel * float(r.abs().max()) + rtol * r.abs()
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), err * math.inf)
    ratio = torch.nan_to_num(ratio, nan=0.0)  # 0 * inf where err == 0
    worst, max_err = float(ratio.max()), float(err.max())
    ok = worst <= 1.0
    msg = (
        f"max err {max_err:.3e} = {worst:.2f} x bound (atol {atol_rel:g}*max|ref| + rtol {rtol:g})"
    )
    return Check(ok, max_err, worst, ("ok: " if ok else "MISMATCH: ") + msg)


# ------------------------------------------------------------------------------- registry
Builder = Callable[[Options], list[Case]]
REGISTRY: dict[str, Builder] = {}
DEFAULT_OPS: list[str] = []  # the default suite (``fastattn-bench`` without OPS, ``make bench``)


def register(op: str, default: bool = True) -> Callable[[Builder], Builder]:
    def deco(builder: Builder) -> Builder:
        REGISTRY[op] = builder
        if default and op not in DEFAULT_OPS:
            DEFAULT_OPS.append(op)
        return builder

    return deco


def build(ops: list[str] | None, opts: Options) -> list[Case]:
    """Cases of ``ops`` (the default suite when None or empty), in registry order."""
    names = [n for n in REGISTRY if n in DEFAULT_OPS] if not ops else ops
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered: {', '.join(REGISTRY)}")
    return [case for name in names for case in REGISTRY[name](opts)]


# ---------------------------------------------------------------------------------- helpers
def compiled(fn: Callable[..., Out]) -> Callable[..., Out]:
    """``torch.compile(fn)`` for one static shape per case; compiles lazily on the first call."""
    cfg = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):  # one entry per case shares fn's code
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(int(getattr(cfg, knob)), 512))
    return torch.compile(fn, dynamic=False)


def backend_label(op: str, opts: Options, dtype: torch.dtype, kernel: str | None = None) -> str:
    """``fastattn[<backend that will run>]``, e.g. ``fastattn[cpu]``; ``kernel``: the C++ op
    behind ``op`` when its name differs (``norm`` for ``layer_norm``)."""
    from fastattn import dispatch

    cpp = dispatch.cpp_kernels(kernel or op)
    try:
        name = dispatch.select(opts.backend, torch.device(opts.device), dtype, op, cpp)
        return f"fastattn[{name}]"
    except RuntimeError:  # the backend cannot run here: the call itself will say why
        return f"fastattn[{opts.backend}?]"


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def call_with(f: Callable[..., Out], *keys: str) -> Fn:
    """``inputs -> f(inputs[keys[0]], inputs[keys[1]], ...)``."""
    return lambda i: f(*(i[k] for k in keys))


def fwd_bwd(forward: Fn, wrt: Sequence[str] = ("x",), upstream: Sequence[str] = ("g",)) -> Fn:
    """Forward, then backward of its output(s) with the upstream gradients ``inputs[upstream]``;
    returns the gradients of ``inputs[wrt]`` (a tensor when there is one)."""

    def run(inp: Inputs) -> Out:
        outs = forward(inp)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, [inp[k] for k in wrt], [inp[k] for k in upstream])
        return grads[0] if len(grads) == 1 else tuple(grads)

    return run


def float64(inp: Inputs, wrt: Sequence[str] = ()) -> Inputs:
    """Detached float64 copies of the floating-point inputs (``wrt`` requiring grad)."""
    return {
        k: v.detach().double().requires_grad_(k in wrt) if v.is_floating_point() else v
        for k, v in inp.items()
    }


def oracle(fn: Fn, wrt: Sequence[str] | None = None, upstream: Sequence[str] = ("g",)) -> Fn:
    """``fn`` on float64 copies of the inputs; with ``wrt``, its gradients (see fwd_bwd)."""
    if wrt is None:
        return lambda i: fn(float64(i))
    grads = fwd_bwd(fn, wrt, upstream)
    return lambda i: grads(float64(i, wrt))


# ---------------------------------------------------------------------------------- softmax
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


# ------------------------------------------------------------------------------------ norms
NORM_SHAPES: tuple[tuple[int, ...], ...] = ((4096, 768), (2048, 4096), (512, 8192))
NORM_QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((64, 1000),)  # one shape: fewer compilations
LN_EPS = 1e-5  # torch.nn.LayerNorm's default
RMS_EPS = 1e-6  # Llama's
# Measured with torch 2.13 on this CPU: eager F.layer_norm's backward of bf16 inputs returns
# weight/bias gradients with a median relative error of 1-5% (it grows with the row count; max
# error 1.5-5x the bf16 bound), also with fp32 weights; torch.compile's and fastattn's are within
# bf16 rounding. That peer is still timed and its check shown, marked "inexact".
TORCH_LN_GRAD_NOTE = "torch's CPU LayerNorm backward: bf16 weight/bias grads off by 1-5%"


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The eager RMSNorm of Hugging Face's Llama (``LlamaRMSNorm.forward``): statistics and the
    normalisation in fp32, the normalised x cast back to x's dtype, then multiplied by the weight
    (so a bf16 model rounds twice, and the product has the promoted dtype of weight and x)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return weight * xf.to(x.dtype)


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w, b, LN_EPS)


def _rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], w, RMS_EPS)


def _add_layer_norm(
    x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + r
    return _layer_norm(h, w, b), h


def _add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + r
    return _rms_norm(h, w), h


def _add_llama_rms_norm(
    x: torch.Tensor, r: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + r
    return llama_rms_norm(h, w), h


# op -> (RMSNorm?, residual?, eager peers as (name, function), each also torch.compile'd)
_NORM_OPS: dict[str, tuple[bool, bool, tuple[tuple[str, Callable[..., Out]], ...]]] = {
    "layernorm": (False, False, (("F.layer_norm", _layer_norm),)),
    "rmsnorm": (True, False, (("F.rms_norm", _rms_norm), ("Llama RMSNorm", llama_rms_norm))),
    "add-layernorm": (False, True, (("add+F.layer_norm", _add_layer_norm),)),
    "add-rmsnorm": (
        True,
        True,
        (("add+F.rms_norm", _add_rms_norm), ("add+Llama RMSNorm", _add_llama_rms_norm)),
    ),
}


def _norm_inputs(
    dev: torch.device, shape: tuple[int, ...], dt: torch.dtype, keys: tuple[str, ...], grad: bool
) -> Inputs:
    """x with a non-zero mean, residual r, weight w near 1, bias b near 0 (params in x's dtype,
    as in a model cast to it), and the upstream gradients g (of y) and gh (of h)."""
    cols = shape[-1]
    make = {
        "x": lambda: randn(shape, dt, dev, 0) * 2 + 0.5,
        "r": lambda: randn(shape, dt, dev, 1),
        "w": lambda: randn((cols,), dt, dev, 2) * 0.1 + 1,
        "b": lambda: randn((cols,), dt, dev, 3) * 0.1,
        "g": lambda: randn(shape, dt, dev, 4),
        "gh": lambda: randn(shape, dt, dev, 5),
    }
    inp = {k: make[k]() for k in keys}
    for k in ("x", "r", "w", "b") if grad else ():
        if k in inp:
            inp[k].requires_grad_()
    return inp


def norm_bytes(rows: int, cols: int, es: int, *, residual: bool, params: int, bwd: bool) -> int:
    """Bytes moved by the fused op, each tensor read or written once at its own size.

    Forward: read x (and the residual), write y (and h = x + residual), read the ``params``
    (weight, bias). Backward: read dy (and dh), read x (or h), write dx (the residual's gradient
    is the same tensor), read the params and write their gradients. The fp32 mean/rstd per row
    are left out (< 0.1% of the traffic at these sizes).
    """
    n, p = rows * cols, params * cols
    fwd = (2 + 2 * residual) * n + p
    return (fwd + ((3 + residual) * n + 2 * p if bwd else 0)) * es


def _norm_cases(opts: Options, op: str) -> list[Case]:
    """fastattn against eager PyTorch and torch.compile of each eager peer, forward and
    forward+backward (gradients of x, residual, weight and bias, all checked)."""
    import fastattn
    from fastattn import reference

    rms, residual, peers = _NORM_OPS[op]
    eps = RMS_EPS if rms else LN_EPS
    params = ("w",) if rms else ("w", "b")
    args = ("x", "r", *params) if residual else ("x", *params)
    upstream = ("g", "gh") if residual else ("g",)
    be = opts.backend

    def runtime_peers(dt: torch.dtype) -> list[Impl]:
        from fastattn.bench import peers

        return peers.norm_peers(op, eps, dt, opts.device) if opts.runtimes else []

    def fast(i: Inputs) -> Out:
        x, r = i["x"], i.get("r")
        if rms:
            return fastattn.rms_norm(x, x.shape[-1], i["w"], eps, residual=r, backend=be)
        return fastattn.layer_norm(x, x.shape[-1], i["w"], i["b"], eps, residual=r, backend=be)

    def ref(i: Inputs) -> Out:
        w, b = i["w"], i.get("b")
        y, h = reference.norm(i["x"], w, b, eps, rms, i.get("r"))
        return y if h is None else (y, h)

    cases: list[Case] = []
    for shape in opts.shapes or (NORM_QUICK_SHAPES if opts.quick else NORM_SHAPES):
        rows, cols = math.prod(shape[:-1]), shape[-1]
        for dt in opts.dtypes:
            es = torch.empty((), dtype=dt).element_size()
            impls = [
                Impl(
                    backend_label("rms_norm" if rms else "layer_norm", opts, dt, "norm"), fast, True
                )
            ]
            impls += [Impl(name, call_with(f, *args)) for name, f in peers]
            if opts.compile:
                impls += [Impl(f"compile({n})", call_with(compiled(f), *args)) for n, f in peers]
            for bwd in (False, True):
                keys = args + (upstream if bwd else ())
                make = functools.partial(_norm_inputs, shape=shape, dt=dt, keys=keys, grad=bwd)
                nbytes = norm_bytes(rows, cols, es, residual=residual, params=len(params), bwd=bwd)
                wrt = args if bwd else None
                variant = "fwd+bwd" if bwd else "fwd"
                timed = [Impl(m.name, fwd_bwd(m.fn, args, upstream), m.subject) for m in impls]
                if not rms and dt != torch.float32 and opts.device == "cpu":
                    timed[1].inexact = TORCH_LN_GRAD_NOTE  # the eager F.layer_norm peer
                case = Case(op, variant, shape, dt, make, oracle(ref, wrt, upstream), nbytes)
                case.impls = timed if bwd else [*impls, *runtime_peers(dt)]
                cases.append(case)
    return cases


@register("layernorm")
def layernorm_cases(opts: Options) -> list[Case]:
    return _norm_cases(opts, "layernorm")


@register("rmsnorm")
def rmsnorm_cases(opts: Options) -> list[Case]:
    return _norm_cases(opts, "rmsnorm")


@register("add-layernorm")
def add_layernorm_cases(opts: Options) -> list[Case]:
    return _norm_cases(opts, "add-layernorm")


@register("add-rmsnorm")
def add_rmsnorm_cases(opts: Options) -> list[Case]:
    return _norm_cases(opts, "add-rmsnorm")


# -------------------------------------------------------------------------------- attention
# Shapes (batch, heads, seqlen, head_dim) of self-attention, and (batch, heads, kv_heads,
# seqlen_q, seqlen_k, head_dim) of decoding against a KV cache (grouped-query, forward only).
ATTN_SHAPES: tuple[tuple[int, ...], ...] = (
    (1, 8, 512, 64),
    (1, 8, 1024, 64),
    (1, 8, 2048, 64),
    (1, 8, 2048, 128),
    (1, 8, 4096, 64),
    (1, 8, 4096, 128),
    (1, 32, 8, 1, 8192, 128),
)
ATTN_QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((1, 2, 128, 32), (1, 4, 2, 1, 512, 32))


def attention_dims(shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """(B, H, Hkv, Sq, Sk, D) of a ``BxHxSxD`` or ``BxHxHkvxSqxSkxD`` shape."""
    if len(shape) == 4:
        b, h, s, d = shape
        return b, h, h, s, s, d
    if len(shape) == 6:
        b, h, hkv, sq, sk, d = shape
        if h % hkv:
            raise ValueError(f"attention shape {shape}: heads {h} not a multiple of kv_heads")
        return b, h, hkv, sq, sk, d
    raise ValueError(f"attention shape {shape}: expected BxHxSxD or BxHxHkvxSqxSkxD")


def attention_flops(shape: tuple[int, ...], causal: bool, bwd: bool) -> int:
    """4*B*H*Sq*Sk*D for the two matrix products of the forward pass, half of it when causal
    (the skipped blocks), 3.5 times that with the backward (FlashAttention's count)."""
    b, h, _, sq, sk, d = attention_dims(shape)
    f = 4 * b * h * sq * sk * d // (2 if causal else 1)
    return f * 7 // 2 if bwd else f


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    """The textbook composition in the input's dtype: ``softmax(q @ k^T * scale) @ v``, k and v
    repeated over the query heads of their group (grouped-query attention), the causal mask
    aligned bottom-right (the same as top-left when seqlen_q == seqlen_k)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        sq, sk = s.shape[-2:]
        hide = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(sk - sq + 1)
        s = s.masked_fill(hide, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _eager_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return eager_attention(q, k, v, causal=False)


def _eager_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return eager_attention(q, k, v, causal=True)


def _attn_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype, grad: bool) -> Inputs:
    b, h, hkv, sq, sk, d = attention_dims(shape)
    inp = {
        "q": randn((b, h, sq, d), dt, dev, 0),
        "k": randn((b, hkv, sk, d), dt, dev, 1),
        "v": randn((b, hkv, sk, d), dt, dev, 2),
    }
    if grad:
        for t in inp.values():
            t.requires_grad_()
        inp["g"] = randn((b, h, sq, d), dt, dev, 3)
    return inp


# Eager attention in bf16 rounds the (Sq, Sk) scores and probabilities to bf16: at 4096 keys its
# error reaches ~1.2x the bf16 bound of the oracle check (fastattn keeps them in fp32).
EAGER_BF16_NOTE = "eager bf16 rounds the scores and probabilities to bf16"


@register("attention", default=False)  # ~15 min at full size here: `make bench-attention`
def attention_cases(opts: Options) -> list[Case]:
    """fastattn.attention against eager attention, F.scaled_dot_product_attention and
    torch.compile of the eager version ("F.sdpa" in the tables is F.scaled_dot_product_attention):
    forward and forward+backward (dq, dk, dv checked),
    causal and not, and a grouped-query decode step (forward only); the forward also against
    onnxruntime and OpenVINO (peers.py). Reports GFLOP/s, % of the machine's measured peak
    and each call's peak extra memory besides ms and GB/s."""
    import fastattn
    from fastattn import reference

    be = opts.backend
    peak = opts.peak_gflops
    qkv = ("q", "k", "v")
    cases: list[Case] = []
    for shape in opts.shapes or (ATTN_QUICK_SHAPES if opts.quick else ATTN_SHAPES):
        b, h, hkv, sq, sk, d = attention_dims(shape)
        gqa = h != hkv
        # self-attention: fwd/fwd+bwd x full/causal; 6-dim shapes (decode): forward, not causal
        flags = (False, True)
        modes = [(False, False)] if len(shape) == 6 else [(c, w) for w in flags for c in flags]
        for dt in opts.dtypes:
            es = torch.empty((), dtype=dt).element_size()
            io = (2 * b * h * sq * d + 2 * b * hkv * sk * d) * es  # q, o; k, v
            for causal, bwd in modes:

                def fast(i: Inputs, causal: bool = causal) -> Out:
                    out: Out = fastattn.attention(i["q"], i["k"], i["v"], causal=causal, backend=be)
                    return out

                def sdpa(i: Inputs, causal: bool = causal, gqa: bool = gqa) -> Out:
                    return F.scaled_dot_product_attention(
                        i["q"], i["k"], i["v"], is_causal=causal, enable_gqa=gqa
                    )

                def ref(i: Inputs, causal: bool = causal, off: int = sk - sq) -> Out:
                    return reference.attention(i["q"], i["k"], i["v"], None, None, causal, off)[0]

                eager = _eager_causal if causal else _eager_full
                low = dt in (torch.bfloat16, torch.float16)
                impls = [
                    Impl(backend_label("attention", opts, dt), fast, subject=True),
                    Impl("eager", call_with(eager, *qkv), inexact=EAGER_BF16_NOTE * low),
                    Impl("F.sdpa", sdpa),
                ]
                if opts.compile:
                    impls.append(Impl("compile(eager)", call_with(compiled(eager), *qkv)))
                if bwd:
                    impls = [Impl(m.name, fwd_bwd(m.fn, qkv), m.subject) for m in impls]
                elif opts.runtimes:
                    from fastattn.bench import peers

                    dims = (b, h, hkv, sq, sk, d)
                    impls += peers.attention_peers(dims, causal, dt, opts.device)
                variant = ("fwd+bwd" if bwd else "fwd") + (" causal" if causal else "")
                if len(shape) == 6:
                    variant = ("decode " if sq <= 16 else "") + variant + (f" GQA {h}/{hkv}" * gqa)
                make = functools.partial(_attn_inputs, shape=shape, dt=dt, grad=bwd)
                # forward: q, k, v read, o written; backward: q, k, v, o, do read, dq, dk, dv
                # written: three times the forward
                nbytes = 3 * io if bwd else io
                oracle_fn = oracle(ref, qkv if bwd else None)
                case = Case("attention", variant, shape, dt, make, oracle_fn, nbytes, impls)
                case.flops = attention_flops(shape, causal, bwd)
                case.peak_gflops = peak.get(DTYPE_NAMES.get(dt, ""), math.nan)
                case.memory = True
                cases.append(case)
    return cases


from fastattn.bench import model_cases as _model_cases  # noqa: E402, F401  (registers "model")
