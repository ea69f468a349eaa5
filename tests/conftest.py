"""Shared test set-up: the Triton interpreter, backends to test, and the one tolerance table."""

from __future__ import annotations

import os

# Must precede any `import triton`: CPU tensors then run Triton kernels in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTATTN_POISON_OUTPUTS"] = "1"  # unwritten output elements become NaN
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".cache", "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

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
# outputs or their gradients reach 20-30 where one fp16 ulp is already 0.016.
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

HAS_CUDA = torch.cuda.is_available()


# Backends that run here on CPU tensors; the compiled CPU backend must exist in the test run
# (a missing build is a failure, not a skip — see test_extension_is_built).
CPU_BACKENDS = ["cpu", "triton", "reference"]
GPU_BACKENDS = ["triton", "cuda", "reference"]


def finite_parts_match(fast: torch.Tensor, ref: torch.Tensor) -> None:
    """Same pattern of NaN/±inf, so values can then be compared on the finite entries."""
    assert torch.equal(torch.isnan(fast), torch.isnan(ref)), "NaN pattern differs"
    for sign in (1, -1):
        assert torch.equal(fast == sign * float("inf"), ref == sign * float("inf")), "inf differs"


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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_report_header(config: pytest.Config) -> list[str]:
    rep = fastattn.backends()
    lines = [f"fastattn {fastattn.__version__}; extension: {rep['extension']}"]
    for name, st in rep["backends"].items():
        lines.append(
            f"  backend {name}: {'yes' if st['available'] else 'no (' + st['reason'] + ')'}"
        )
    return lines
