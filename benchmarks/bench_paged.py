"""pytest-benchmark: the paged decode step of ``fastattn-bench paged`` (issue 16; the cases
of ``fastattn.bench.cases``, see conftest.py). Full sizes take minutes here:
``python -m pytest benchmarks/bench_paged.py --bench-size full``."""

from __future__ import annotations

from collections.abc import Callable

from fastattn.bench import cases as C

OP = "paged"


def test_paged(case: C.Case, impl: C.Impl, run_case: Callable[[C.Case, C.Impl], None]) -> None:
    run_case(case, impl)
