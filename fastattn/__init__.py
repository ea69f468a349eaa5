"""fastattn: fused attention, normalisation and softmax kernels as drop-in PyTorch ops.

Every op takes ``backend="auto" | "triton" | "cuda" | "cpu" | "reference"`` (default from
``FASTATTN_BACKEND``); :func:`backends` reports which are usable here and why not.
"""

import importlib
from typing import Any

from fastattn import nn
from fastattn._extension import cpu_cache_info, empty_cpu_cache
from fastattn._version import __version__
from fastattn.dispatch import backends
from fastattn.ops.attention import attention
from fastattn.ops.norm import layer_norm, rms_norm
from fastattn.ops.paged import paged_attention
from fastattn.ops.sdpa import scaled_dot_product_attention
from fastattn.ops.softmax import softmax
from fastattn.ops.varlen import varlen_attention
from fastattn.patching import PatchReport, patch, sdpa_scope, unpatch

# Submodules that load on first attribute access, so that `import fastattn` stays light and
# `fastattn.models.Transformer(...)` works without importing fastattn.models first.
_LAZY = ("bench", "integrations", "models", "reference", "serving")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"fastattn.{name}")
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "PatchReport",
    "__version__",
    "attention",
    "backends",
    "cpu_cache_info",
    "empty_cpu_cache",
    "layer_norm",
    "nn",
    "paged_attention",
    "patch",
    "rms_norm",
    "scaled_dot_product_attention",
    "sdpa_scope",
    "softmax",
    "unpatch",
    "varlen_attention",
]
