"""Functional ops: one module per op (kernels, launchers, custom-op glue, public function).

The public functions are re-exported at the package top level (``fastattn.softmax``), so that
``fastattn.ops.<op>`` always names the op's module.
"""
