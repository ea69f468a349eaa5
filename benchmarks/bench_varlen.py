"""pytest-benchmark: the packed training step of ``fastattn-bench varlen`` (issue 16; the cases
of ``fastattn.bench.cases``, see conftest.py). Full sizes take minutes here:
``python -m pytest benchmarks/bench_varlen.py --bench-size full``."""

from __future__ import annotations

from collections.abc import Callable

from fastattn.bench import cases as C

OP = "varlen"


def test_varlen(case: C.Case, impl: C.Impl, run_case: Callable[[C.Case, C.Impl], None]) -> None:
    run_case(case, impl)
