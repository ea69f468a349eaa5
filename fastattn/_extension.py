"""Loads the compiled extension ``fastattn._C`` once; the package works without it.

Importing ``_C`` runs the ``TORCH_LIBRARY`` static initialisers that register the C++ kernels as
``torch.ops.fastattn.*``. If the module is missing or fails to load, fastattn warns once with the
reason and the Triton and reference backends keep working. The module is internal to the
package (its name says so); the functions below are its surface for the package's other modules.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

__all__ = ["build_info", "cpu_cache_info", "empty_cpu_cache", "error", "load"]

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def load() -> ModuleType | None:
    """Returns ``fastattn._C``, or None (after one warning) when it cannot be imported."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("fastattn._C")
        except (ImportError, OSError) as e:  # not built, or built against another torch
            _error = f"{type(e).__name__}: {e}"
            warnings.warn(
                "fastattn: the compiled extension fastattn._C is unavailable, so the 'cpu' and "
                f"'cuda' backends are off (Triton and reference still work). Reason: {_error}. "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _module


def error() -> str | None:
    """Why the extension failed to load, or None."""
    load()
    return _error


def build_info() -> dict[str, Any]:
    """Build facts reported by the extension (empty when it is missing)."""
    mod = load()
    return dict(mod.build_info()) if mod is not None else {}


def cpu_cache_info() -> dict[str, int]:
    """The CPU ops' cache of freed output blocks: ``limit_bytes`` (``FASTATTN_CPU_CACHE_BYTES``,
    default 256 MiB; 0 turns it off), ``cached_bytes`` / ``cached_blocks`` (kept for reuse),
    ``live_bytes`` (held by tensors now), ``hits`` / ``misses`` (outputs served from the cache /
    from fresh memory). Outputs of 1 MiB or more come from it; reusing a block spares the page
    faults and zeroing of fresh memory on every call. Empty without the extension."""
    mod = load()
    return dict(mod.cpu_cache_info()) if mod is not None else {}


def empty_cpu_cache() -> int:
    """Returns the cached output blocks of the CPU ops to the OS (as ``torch.cuda.empty_cache``
    does for CUDA); the bytes released. Tensors alive now are not affected."""
    mod = load()
    return int(mod.empty_cpu_cache()) if mod is not None else 0
