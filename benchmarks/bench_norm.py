"""pytest-benchmark: ``fastattn.layer_norm`` / ``rms_norm`` (plain and with the fused residual
add) vs F.layer_norm, F.rms_norm, the eager Llama RMSNorm and torch.compile of the eager version,
forward and forward+backward, on the norm cases of ``fastattn.bench.cases`` (see conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

from fastattn.bench import cases as C

OP = ("layernorm", "rmsnorm", "add-layernorm", "add-rmsnorm")


def test_norm(case: C.Case, impl: C.Impl, run_case: Callable[[C.Case, C.Impl], None]) -> None:
    run_case(case, impl)
