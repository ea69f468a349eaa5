"""pytest-benchmark: ``fastattn.softmax`` vs torch.softmax, the eager scale+mask chain and
torch.compile of it, on the softmax cases of ``fastattn.bench.cases`` (see conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

from fastattn.bench import cases as C

OP = "softmax"


def test_softmax(case: C.Case, impl: C.Impl, run_case: Callable[[C.Case, C.Impl], None]) -> None:
    run_case(case, impl)
