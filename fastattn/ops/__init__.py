"""Functional ops: one module per op (kernels, launchers, custom-op glue, public function)."""

from fastattn.ops.softmax import softmax

__all__ = ["softmax"]
