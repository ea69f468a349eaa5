"""Benchmark cases: every registered builder, and :func:`build`, which turns options into cases.

Shared by the ``fastattn-bench`` CLI and the pytest-benchmark suite (``benchmarks/``). The types,
the float64 check and the registry are in :mod:`fastattn.bench.framework`; the builders in one
module per op family (``cases_softmax``, ``cases_norm``, ``cases_attention``, ``cases_model``).
To add an op, write a builder ``def <op>_cases(opts: Options) -> list[Case]`` in such a module,
decorate it with ``@register("<op>")`` and import the module below: the CLI's positional ``OPS``
and the default suite pick it up (``@register("<op>", default=False)``: only when named, for ops
too slow for ``make bench``). The names of those modules are re-exported here, so
``fastattn.bench.cases`` stays the one place to take cases and their helpers from.

Building cases is cheap (no tensors, no compilation): inputs are made by ``Case.make_inputs``
and ``torch.compile`` peers compile on their first call, which the runners exclude from timing.
"""

from __future__ import annotations

# The order of these imports is the order of the registry (and of the default suite's run):
# keep it; isort would sort them.
# isort: off
from fastattn.bench.framework import (
    DEFAULT_OPS,
    DTYPE_NAMES,
    DTYPES,
    REGISTRY,
    TOLERANCE,
    Builder,
    Case,
    Check,
    Fn,
    Impl,
    Inputs,
    Options,
    Out,
    backend_label,
    call_with,
    compare,
    compiled,
    float64,
    fwd_bwd,
    oracle,
    randn,
    register,
)
from fastattn.bench.cases_softmax import (
    SCALE,
    SOFTMAX_QUICK_SHAPES,
    SOFTMAX_SHAPES,
    softmax_cases,
)
from fastattn.bench.cases_norm import (
    LN_EPS,
    NORM_QUICK_SHAPES,
    NORM_SHAPES,
    RMS_EPS,
    TORCH_LN_GRAD_NOTE,
    add_layernorm_cases,
    add_rmsnorm_cases,
    layernorm_cases,
    llama_rms_norm,
    norm_bytes,
    rmsnorm_cases,
)
from fastattn.bench.cases_attention import (
    ATTN_QUICK_SHAPES,
    ATTN_SHAPES,
    EAGER_BF16_NOTE,
    attention_cases,
    attention_dims,
    attention_flops,
    eager_attention,
)
from fastattn.bench.cases_model import model_cases
from fastattn.bench.cases_varlen import varlen_cases
from fastattn.bench.cases_paged import paged_cases

# isort: on

__all__ = [
    "ATTN_QUICK_SHAPES",
    "ATTN_SHAPES",
    "DEFAULT_OPS",
    "DTYPES",
    "DTYPE_NAMES",
    "EAGER_BF16_NOTE",
    "LN_EPS",
    "NORM_QUICK_SHAPES",
    "NORM_SHAPES",
    "REGISTRY",
    "RMS_EPS",
    "SCALE",
    "SOFTMAX_QUICK_SHAPES",
    "SOFTMAX_SHAPES",
    "TOLERANCE",
    "TORCH_LN_GRAD_NOTE",
    "Builder",
    "Case",
    "Check",
    "Fn",
    "Impl",
    "Inputs",
    "Options",
    "Out",
    "add_layernorm_cases",
    "add_rmsnorm_cases",
    "attention_cases",
    "attention_dims",
    "attention_flops",
    "backend_label",
    "build",
    "call_with",
    "compare",
    "compiled",
    "eager_attention",
    "float64",
    "fwd_bwd",
    "layernorm_cases",
    "llama_rms_norm",
    "model_cases",
    "paged_cases",
    "varlen_cases",
    "norm_bytes",
    "oracle",
    "randn",
    "register",
    "rmsnorm_cases",
    "softmax_cases",
]


def build(ops: list[str] | None, opts: Options) -> list[Case]:
    """Cases of ``ops`` (the default suite when None or empty), in registry order."""
    names = [n for n in REGISTRY if n in DEFAULT_OPS] if not ops else ops
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered: {', '.join(REGISTRY)}")
    return [case for name in names for case in REGISTRY[name](opts)]
