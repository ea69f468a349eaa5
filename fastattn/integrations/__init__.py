"""Integrations with model libraries (imported on demand, so their packages stay optional)."""

import importlib
from typing import Any

_LAZY = ("transformers",)


def __getattr__(name: str) -> Any:
    """``fastattn.integrations.transformers`` imports it (and transformers) on first use."""
    if name in _LAZY:
        return importlib.import_module(f"fastattn.integrations.{name}")
    raise AttributeError(f"module 'fastattn.integrations' has no attribute {name!r}")
