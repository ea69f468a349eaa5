"""pytest-benchmark: ``fastattn.attention`` vs eager attention, F.scaled_dot_product_attention
and torch.compile of the eager version (forward, forward+backward, causal, a grouped-query decode
step), on the attention cases of ``fastattn.bench.cases`` (see conftest.py). Full sizes take long
here: ``python -m pytest benchmarks/bench_attention.py --bench-size full``."""

from __future__ import annotations

from collections.abc import Callable

from fastattn.bench import cases as C

OP = "attention"


def test_attention(case: C.Case, impl: C.Impl, run_case: Callable[[C.Case, C.Impl], None]) -> None:
    run_case(case, impl)
