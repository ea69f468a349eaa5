"""pytest-benchmark suite: fastattn and its peers on the cases of ``fastattn.bench.cases``.

Not part of the default test run (``testpaths = tests``). Run it with::

    python -m pytest benchmarks/                      # full shapes, timed by pytest-benchmark
    python -m pytest benchmarks/ --benchmark-disable  # CI smoke: small shapes, each impl once

Each ``bench_<op>.py`` sets ``OP = "<op>"`` (or a tuple of ops) and takes the ``case``/``impl``
parameters that :func:`pytest_generate_tests` draws from the registry, so the suite and
``fastattn-bench`` time the same cases. Every result is checked against the float64 oracle.

Shapes: ``--bench-size quick|full`` (or ``FASTATTN_BENCH_SIZE``); the default is ``quick`` when
benchmarks are disabled (one call each) and ``full`` when they are timed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".cache", "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn.bench import cases as C  # noqa: E402
from fastattn.bench import timing  # noqa: E402

_OPTIONS = pytest.StashKey[C.Options]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("fastattn-bench", "fastattn benchmark cases")
    g.addoption("--bench-size", choices=("quick", "full"), default=None, help="case shapes")
    g.addoption("--bench-dtype", default="fp32,bf16", help="comma-separated dtypes")
    g.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu")
    g.addoption("--bench-backend", default="auto", help="fastattn backend")
    g.addoption("--bench-alloc", choices=timing.ALLOC_MODES, default="fresh")
    g.addoption("--bench-no-compile", action="store_true", help="skip the torch.compile peers")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if not parent.session.isinitpath(file_path):  # named on the command line: pytest does it
            return pytest.Module.from_parent(parent, path=file_path)
    return None


def _benchmarks_disabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption(
        "benchmark_enable", False
    )


def pytest_configure(config: pytest.Config) -> None:
    from fastattn.bench.cli import parse_dtypes

    size = config.getoption("bench_size") or os.environ.get("FASTATTN_BENCH_SIZE")
    quick = size == "quick" if size else _benchmarks_disabled(config)
    config.stash[_OPTIONS] = C.Options(
        quick=quick,
        dtypes=parse_dtypes(config.getoption("bench_dtype")),
        device=config.getoption("bench_device"),
        backend=config.getoption("bench_backend"),
        compile=not config.getoption("bench_no_compile"),
    )
    if config.getoption("bench_device") == "cpu":
        timing.set_alloc_mode(config.getoption("bench_alloc"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    opts = config.stash[_OPTIONS]
    rep = fastattn.backends()
    avail = [n for n, st in rep["backends"].items() if st["available"]]
    return [
        f"fastattn-bench cases: {'quick' if opts.quick else 'full'} shapes, "
        f"dtypes {[C.DTYPE_NAMES[d] for d in opts.dtypes]}, device {opts.device}, "
        f"backend {opts.backend}, alloc {timing.alloc_mode()}, torch threads "
        f"{torch.get_num_threads()}; fastattn backends available: {avail}"
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not {"case", "impl"} <= set(metafunc.fixturenames):
        return
    op: str | tuple[str, ...] = metafunc.module.OP  # each bench_<op>.py names its op(s)
    ops = [op] if isinstance(op, str) else list(op)
    params = [
        pytest.param(case, impl, id=f"{case.id}-{impl.name}".replace(" ", "_"))
        for case in C.build(ops, metafunc.config.stash[_OPTIONS])
        for impl in case.impls
    ]
    metafunc.parametrize(("case", "impl"), params)


_inputs_cache: dict[str, tuple[C.Inputs, torch.Tensor]] = {}


def _inputs(case: C.Case, device: torch.device) -> tuple[C.Inputs, torch.Tensor]:
    """Inputs and oracle of ``case``, kept while its implementations run one after another."""
    if case.id not in _inputs_cache:
        _inputs_cache.clear()
        inputs = case.make_inputs(device)
        _inputs_cache[case.id] = (inputs, case.reference(inputs))
    return _inputs_cache[case.id]


@pytest.fixture
def run_case(benchmark: Any, request: pytest.FixtureRequest) -> Callable[[C.Case, C.Impl], None]:
    """``run_case(case, impl)``: time ``impl`` on the case's inputs, then check its result."""
    opts = request.config.stash[_OPTIONS]
    device = torch.device(opts.device)

    def run(case: C.Case, impl: C.Impl) -> None:
        inputs, ref = _inputs(case, device)
        fn: Callable[[], torch.Tensor] = lambda: impl.fn(inputs)
        if device.type == "cuda":
            fn = lambda: _synchronized(impl.fn(inputs))
        if not benchmark.disabled:
            fn()  # warm-up: compiles torch.compile peers outside the timing
        benchmark.group = case.id
        benchmark.extra_info.update(impl=impl.name, subject=impl.subject, bytes=case.nbytes)
        out = benchmark(fn)
        chk = C.compare(out, ref, case.dtype)
        known = impl.inexact and not impl.subject  # a peer known to be inexact (see cases.py)
        assert chk.ok or known, f"{case.id} {impl.name}: {chk.message}"
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = round(timing.gbps(case.nbytes, median * 1e3), 2)

    return run


def _synchronized(t: torch.Tensor) -> torch.Tensor:
    torch.cuda.synchronize()
    return t
