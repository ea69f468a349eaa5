"""Shared test set-up: the Triton interpreter, backends to test, and the one tolerance table."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch  # importing torch does not import triton: TRITON_INTERPRET can still be chosen

HAS_CUDA = torch.cuda.is_available()
# Without a GPU, CPU tensors run the Triton kernels in the interpreter. With one, the GPU tests
# must run the compiled kernels, so the interpreter is left off unless asked for (`make test`
# asks: its CPU-tensor Triton tests then run and the GPU Triton tests skip, see below). Must
# precede any `import triton`: the interpreter is chosen when the kernels are decorated.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
os.environ["FASTATTN_POISON_OUTPUTS"] = "1"  # unwritten output elements become NaN
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".cache", "inductor"))

import fastattn  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core) each worker's torch gets its share of
# the cores: two workers of two threads each on two cores made the suite 1.5x slower (OpenMP
# threads spinning against each other). The CPU kernels' multi-threaded paths still run in the
# parity grids of tools/cpu_tiers.py, which runs at the full thread count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (_cores or 1) // _workers))

# Tolerance per dtype, against the float64 reference.
# fp16/bf16 use the FlashAttention rule: |fast - ref| <= 2 * |eager_same_dtype - ref| + atol, with
# atol = ATOL * max(1, max|ref|): about one unit of rounding of the dtype at the data's own scale
# (as FlashAttention-3's atol, 2 * |(ref + 0.3 - 0.3) - ref|), since values such as log-softmax
# outputs or their gradients reach 20-30 where one fp16 ulp is already 0.016. eager_same_dtype is
# torch's own ops run in that dtype on the same device (fp16 and bf16 on the CPU too), never the
# kernel under test.
# fp32: |fast - ref| <= max(ATOL + RTOL * max|ref|, 2 * |eager_fp32 - ref| + ATOL) when the test
# passes eager fp32's result (every parity grid does): a fixed relative bound alone is wrong for
# results that sum many terms (a 65537-column softmax gradient, a long attention row), whose
# rounding depends on the order torch's vector path adds them in (AVX2 and AVX-512 differ), so
# the bound follows what eager fp32 itself commits on this CPU. The eager result is torch's own
# kernels (or the reference formula) in fp32, never the kernel under test; for the `reference`
# backend it is that backend itself, which is eager torch by definition.
# fp64: ATOL + RTOL * max|ref| (gradcheck covers the CPU backend in float64).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LOW_PRECISION = (torch.float16, torch.bfloat16)
ROUNDED = (torch.float32, *LOW_PRECISION)  # dtypes judged against eager's own rounding

# Backends that run here on CPU tensors; the compiled CPU backend must exist in the test run
# (a missing build is a failure, not a skip — see test_extension_is_built).
CPU_BACKENDS = ["cpu", "triton", "reference"]
GPU_BACKENDS = ["triton", "cuda", "reference"]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def on_devices(cpu_backends: list[str], gpu_backends: list[str]) -> list:
    """``(backend, device)`` parameters: each CPU backend on CPU tensors, then each GPU backend
    on CUDA tensors (marked ``gpu``). A test taking them creates every tensor on ``device``; its
    CPU rows run with the default device moved elsewhere (``_default_device_elsewhere``)."""
    return [pytest.param(b, "cpu", id=f"{b}-cpu") for b in cpu_backends] + [
        pytest.param(b, "cuda", id=f"{b}-cuda", marks=GPU) for b in gpu_backends
    ]


def finite_parts_match(fast: torch.Tensor, ref: torch.Tensor) -> None:
    """Same pattern of NaN/±inf, so values can then be compared on the finite entries."""
    assert torch.equal(torch.isnan(fast), torch.isnan(ref)), "NaN pattern differs"
    for sign in (1, -1):
        assert torch.equal(fast == sign * float("inf"), ref == sign * float("inf")), "inf differs"


def reference_attention_terms(
    q: torch.Tensor, k: torch.Tensor, causal: bool | str, window: tuple[int, int] | None
) -> tuple[bool, int, tuple[int, int]]:
    """``(causal, causal_offset, window)`` of reference.attention for attention()'s ``causal``
    and ``window`` (docs/attention.md, restated here, not taken from the code under test): the
    causal alignment's offset, bottom-right unless "top_left", which also places a window without
    causal; under causal the window's right side is 0."""
    offset = 0 if causal == "top_left" else k.shape[2] - q.shape[2]
    left, right = window if window else (-1, -1)
    return bool(causal), offset, (left, 0 if causal and window else right)


def sequence_oracle(q, k, v, kw: dict, opmath: torch.dtype, seq: int = 0) -> torch.Tensor:
    """One sequence of a packed / paged batch alone: q ``(seqlen_q, heads, head_dim)``, k, v
    ``(seqlen_k, kv_heads, head_dim)`` through fastattn.reference.attention in ``opmath``
    (float64: the reference; the inputs' dtype: eager in it), aligned bottom-right, with the
    ``kw`` of the public functions (causal, window, softcap, sinks, alibi_slopes: its row
    ``seq`` when (batch, heads)); returns ``(seqlen_q, heads, head_dim_v)`` in q's dtype."""
    from fastattn import reference

    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
    causal, al = bool(kw.get("causal")), kw.get("alibi_slopes")
    if al is not None and al.dim() == 2:
        al = al[seq : seq + 1]
    o, _ = reference.attention(
        qs, ks, vs, None, None, causal, ks.shape[2] - qs.shape[2],
        window=reference_attention_terms(qs, ks, causal, kw.get("window"))[2],
        softcap=kw.get("softcap", 0.0), sinks=kw.get("sinks"), alibi_slopes=al, opmath=opmath,
    )  # fmt: skip
    return o[0].transpose(0, 1).to(q.dtype)


def assert_parity(
    fast: torch.Tensor,
    ref64: torch.Tensor,
    eager: torch.Tensor | None = None,
    what: str = "",
    dtype: torch.dtype | None = None,
    ref_scale: float = 0.0,
) -> None:
    """``fast`` against the float64 reference by the rule of ``dtype`` (default: fast's dtype;
    a float32 mask gradient computed from bf16 activations is judged as bf16)."""
    assert fast.shape == ref64.shape, f"{what}: shape {fast.shape} != {ref64.shape}"
    finite_parts_match(fast.double(), ref64)
    fin = torch.isfinite(ref64)
    if not fin.any():
        return
    err = (fast.double() - ref64)[fin].abs().max().item()
    dt = dtype or fast.dtype
    if dt in LOW_PRECISION:
        assert eager is not None, "low precision needs the eager same-dtype result"
        finite_parts_match(eager.double(), ref64)
        eager_err = (eager.double() - ref64)[fin].abs().max().item()
        bound = 2 * eager_err + ATOL[dt] * max(1.0, ref64[fin].abs().max().item())
    else:
        # ref_scale: the magnitude of the terms a result sums, when it can cancel to ~0.
        bound = ATOL[dt] + RTOL[dt] * max(ref64[fin].abs().max().item(), ref_scale)
        if eager is not None:
            # A result that cancels (e.g. dk = sum_i dS_ij q_i with dS ~ 0) has rounding error at
            # the scale of its terms, not of itself: eager fp32 commits the same, so allow 2x it.
            finite_parts_match(eager.double(), ref64)
            eager_err = (eager.double() - ref64)[fin].abs().max().item()
            bound = max(bound, 2 * eager_err + ATOL[dt])
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} ({dt})"


def refuses_as_the_full_checks(monkeypatch: pytest.MonkeyPatch, module: object, call, exc) -> None:
    """``call()`` raises the same error with ``module``'s fast accept path (``_plain``) as with
    the full checks alone: the fast path accepts nothing the full checks refuse."""
    with pytest.raises(exc) as fast:
        call()
    monkeypatch.setattr(module, "_plain", lambda *a: False)
    with pytest.raises(exc) as full:
        call()
    assert str(fast.value) == str(full.value)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, record=None) -> list:
    """Wraps ``owner.name`` so that each call appends ``record(*args, **kwargs)`` (default 1) to
    the returned list, then runs the real function."""
    calls: list = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1 if record is None else record(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def accepts_as_the_full_checks(monkeypatch: pytest.MonkeyPatch, module: object, calls) -> None:
    """Each of ``calls`` gives the same bits with the fast accept path as with the full checks."""
    fast = [c() for c in calls]
    monkeypatch.setattr(module, "_plain", lambda *a: False)
    for got, want in zip(fast, [c() for c in calls], strict=True):
        for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want)), strict=True):
            assert torch.equal(g, w)


def quick_limits(monkeypatch: pytest.MonkeyPatch, l3_mib: int = 0) -> None:
    """fastattn-bench's machine limits measured small: a 512 x 512 matmul and buffers of
    max(256 MiB, 8 x ``l3_mib``), not 2048 and 8 x this machine's L3 (a VM may report its host's:
    480 MiB here, two 3.75 GiB buffers and ~30 s a measurement). The same code measures; only
    the tests that check the bench's own output use it."""
    from fastattn.bench import limits

    monkeypatch.setattr(limits, "MATMUL_N", 512)
    monkeypatch.setattr(limits, "_l3_bytes", lambda: l3_mib * 2**20)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _default_device_elsewhere(request: pytest.FixtureRequest) -> Iterator[None]:
    """The fake device check. On a GPU machine the default device is the CPU while a GPU test's
    tensors are on CUDA: a tensor the test body creates without ``device=`` (an upstream gradient,
    a mask) then meets CUDA tensors and the test fails there, on the rare GPU run. Here the CPU
    rows of every test parametrized by ``device`` run with the default device set to ``meta``, so
    the same mistake fails on every CPU run: a meta tensor cannot meet a CPU tensor."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    check = params.get("device") == "cpu" and not request.node.get_closest_marker("real_default")
    ctx = torch.device("meta") if check else contextlib.nullcontext()
    with ctx:
        yield


@pytest.fixture(autouse=True)
def _record_case(request: pytest.FixtureRequest) -> None:
    """op, backend, dtype and device of each case into the JUnit XML (tools/gpu_check.py
    summarises the GPU run per op and backend from them)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    op = request.node.path.stem.removeprefix("test_")
    request.node.user_properties.append(("op", op))
    for key in ("backend", "dtype", "device"):
        if key in params:
            request.node.user_properties.append((key, str(params[key])))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-tier-grids",
        action="store_true",
        help="deselect the tests that tools/cpu_tiers.py runs on every CPU tier at full thread "
        "count (make test runs them there, so its suite run leaves them out)",
    )
    parser.addoption(
        "--grid-half",
        type=int,
        choices=(0, 1),
        default=None,
        metavar="R",
        help="keep half of each test_parity_grid*: the cases whose parameter indices (one per "
        "parametrize) sum to R mod 2 (the lower tiers of tools/cpu_tiers.py)",
    )
    parser.addoption(
        "--gpu-subset",
        type=int,
        default=0,
        metavar="N",
        help="keep at most N evenly spread cases of each gpu-marked test per backend and dtype "
        "(the representative subset of make gpu-check); 0: all",
    )


def _subset_key(item: pytest.Item) -> tuple:
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = getattr(item, "originalname", item.name)
    return (item.path.stem, name, str(params.get("backend")), str(params.get("dtype")))


def tier_grid_selection() -> tuple[list[str], str]:
    """(TARGETS, SELECT) of tools/cpu_tiers.py: the files and the -k expression it runs."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "cpu_tiers.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("_cpu_tiers", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.TARGETS), str(mod.SELECT)


def in_tier_grids(item: pytest.Item, targets: list[str], select: str) -> bool:
    """Whether ``pytest <targets> -k <select>`` (tools/cpu_tiers.py's run) selects ``item``:
    pytest's own -k matching, restricted to those files."""
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression

    rel = os.path.relpath(str(item.path), str(item.config.rootpath)).replace(os.sep, "/")
    return rel in targets and Expression.compile(select).evaluate(KeywordMatcher.from_item(item))


def grid_parity(item: pytest.Item) -> int | None:
    """For a test_parity_grid* case: the sum of its parameter indices (one per parametrize
    decorator) mod 2; None for other tests. Neighbouring values of any one parameter have opposite
    parities, so either half holds every value of every parameter and, with a third parameter
    varying, every pair of two (fp32 and bf16 of each shape, each mask of each dtype, ...)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or not getattr(item, "originalname", "").startswith("test_parity_grid"):
        return None
    total = 0
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        want = tuple(callspec.params[n] for n in names)
        for i, value in enumerate(mark.args[1]):
            values = getattr(value, "values", value if len(names) > 1 else (value,))
            if tuple(values) == want:
                total += i
                break
        else:
            raise AssertionError(f"{item.nodeid}: {names} = {want} not among its values")
    return total % 2


def _deselect(config: pytest.Config, items: list[pytest.Item], drop) -> None:
    gone = [it for it in items if drop(it)]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [it for it in items if not drop(it)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--no-tier-grids"):
        targets, select = tier_grid_selection()
        _deselect(config, items, lambda it: in_tier_grids(it, targets, select))
    half = config.getoption("--grid-half")
    if half is not None:
        _deselect(config, items, lambda it: grid_parity(it) not in (None, half))
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        gpu = item.get_closest_marker("gpu") is not None
        if params.get("backend") != "triton":
            continue
        if gpu and INTERPRET and HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="TRITON_INTERPRET=1: the GPU Triton tests "
                                             "need the compiled kernels (run them without it: "
                                             "make gpu-check)"))  # fmt: skip
        elif not gpu and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="CPU-tensor Triton tests run in the "
                                             "interpreter: set TRITON_INTERPRET=1 (make test "
                                             "does)"))  # fmt: skip
    n = config.getoption("--gpu-subset")
    if n <= 0:
        return
    groups: dict[tuple, list[pytest.Item]] = {}
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            groups.setdefault(_subset_key(item), []).append(item)
    drop = set()
    for members in groups.values():
        keep = {round(i * (len(members) - 1) / max(n - 1, 1)) for i in range(n)}
        drop.update(id(m) for j, m in enumerate(members) if j not in keep)
    deselected = [it for it in items if id(it) in drop]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [it for it in items if id(it) not in drop]


def pytest_report_header(config: pytest.Config) -> list[str]:
    rep = fastattn.backends()
    lines = [f"fastattn {fastattn.__version__}; extension: {rep['extension']}"]
    for name, st in rep["backends"].items():
        lines.append(
            f"  backend {name}: {'yes' if st['available'] else 'no (' + st['reason'] + ')'}"
        )
    return lines
