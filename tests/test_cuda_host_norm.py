"""The CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm_kernels.cuh) run on the CPU through the
host execution layer (tools/cuda_host/, docs/cuda-host.md), with norm.cu's launch plan, against
the float64 reference (fastattn.reference.norm).

Every kernel path: forward register kernels (a warp per row, a block per row) and the looped
kernel; backward register kernels (warp, block) and the two-kernel looped path; the dweight/dbias
partial-sum kernel after each. Passing here is not a GPU run (tests/test_cuda_device.py is).
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROUNDED, assert_parity
from cuda_host_lib import DTYPE_CODE, ERR_LEN, check_rc, load, ptr, race_check

from fastattn import reference

EPS = 1e-5
WARP, BLOCK, LOOPED = 0, 1, 2  # NormPath of norm_kernels.cuh
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return load()


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(lib, x, w, b, r, rms, sm_count=1):
    """(y, h, mean, rstd, path) of the forward kernels on x (rows, n). Weight and bias are read
    as x's dtype when both (where given) have it, else converted to its math type (norm.cu's
    param_dtype)."""
    rows, n = x.shape
    native = all(t is None or t.dtype == x.dtype for t in (w, b))
    pw, pb = (t if t is None or native else t.to(math_dtype(x.dtype)) for t in (w, b))
    y = torch.full_like(x, float("nan"))  # an element the kernel fails to write stays NaN
    h = torch.full_like(x, float("nan")) if r is not None else None
    mean = torch.full((rows,), float("nan"), dtype=math_dtype(x.dtype))
    rstd = torch.full_like(mean, float("nan"))
    path, err = ctypes.c_int(-1), ctypes.create_string_buffer(ERR_LEN)
    rc = lib.fa_norm_forward(
        DTYPE_CODE[x.dtype], int(native), ptr(x), ptr(r), ptr(pw), ptr(pb), ptr(y), ptr(h),
        ptr(mean), ptr(rstd), ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_double(EPS),
        int(rms), sm_count, ctypes.byref(path), err, ERR_LEN,
    )  # fmt: skip
    check_rc(rc, err)
    return y, h, mean, rstd, path.value


def backward(lib, dy, dh, inp, w, mean, rstd, rms, has_bias, sm_count=1):
    """(dx, dweight, dbias, path, parts) of the backward kernels: inp is the normalised input (h
    with a residual), dh the gradient of residual_out. dweight and dbias in the math type."""
    rows, n = inp.shape
    native = w is None or w.dtype == inp.dtype
    pw = w if w is None or native else w.to(math_dtype(inp.dtype))
    dx = torch.full_like(inp, float("nan"))
    dw = torch.full((n,), float("nan"), dtype=math_dtype(inp.dtype))
    db = torch.full_like(dw, float("nan")) if has_bias else None
    path, parts = ctypes.c_int(-1), ctypes.c_int64(-1)
    err = ctypes.create_string_buffer(ERR_LEN)
    rc = lib.fa_norm_backward(
        DTYPE_CODE[inp.dtype], int(native), ptr(dy), ptr(dh), ptr(inp), ptr(pw),
        ptr(None if rms else mean), ptr(rstd), ptr(dx), ptr(dw), ptr(db), ctypes.c_int64(rows),
        ctypes.c_int64(n), int(rms), sm_count, ctypes.byref(path), ctypes.byref(parts), err,
        ERR_LEN,
    )  # fmt: skip
    check_rc(rc, err)
    return dx, dw, db, path.value, parts.value


def expected_paths(n: int, dtype: torch.dtype) -> tuple[int, int]:
    """(forward, backward) kernel of norm.cu's plan, as documented there: rows in 16-byte vectors
    when a row is a whole number of them (the tests' tensors are 16-byte aligned), else elements;
    forward: a warp per row up to 4 * 32 vectors, a block up to 4 * 512, looped beyond; backward:
    2 vectors a thread for 16-bit dtypes (4 otherwise), a warp up to that * 32, a block up to
    that * 512."""
    size = torch.empty((), dtype=dtype).element_size()
    vec = 16 // size if n * size % 16 == 0 else 1
    vecs = math.ceil(n / vec)
    nv = 2 if vec >= 8 else 4
    fwd = WARP if vecs <= 4 * 32 else BLOCK if vecs <= 4 * 512 else LOOPED
    bwd = WARP if vecs <= nv * 32 else BLOCK if vecs <= nv * 512 else LOOPED
    return fwd, bwd


def make_case(variant: str, rows: int, n: int, dtype: torch.dtype, rms: bool):
    """Fresh x (rows, n) with a non-zero mean, and weight / bias / residual per variant
    ("mixed": fp32 weight and bias under a 16-bit x)."""
    x = (torch.randn(rows, n) * 2 + 0.5).to(dtype)
    wdt = torch.float32 if variant == "mixed_residual" else dtype
    w = b = r = None
    if variant != "plain" and variant != "residual":
        w = (torch.randn(n) * 0.5 + 1).to(wdt)
        if not rms and variant != "weight":
            b = torch.randn(n).to(wdt)
    if "residual" in variant:
        r = torch.randn(rows, n).to(dtype)
    return x, w, b, r


def grads(x, w, b, r, rms, gy, gh, opmath):
    """[y, dx, dweight, (dbias)] of the reference: float64 (the oracle), or eager torch in x's
    dtype (its rounding, the low-precision rule's baseline). Without a weight, dweight is that
    of a weight of ones (the kernels compute it regardless)."""
    n = x.shape[-1]
    wt = w if w is not None else torch.ones(n, dtype=x.dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wt)]
    bl = b.detach().clone().requires_grad_() if b is not None else None
    if opmath == torch.float64:
        cast = [t.double() for t in leaves]
        rr = r.double() if r is not None else None
        y, _ = reference.norm(cast[0], cast[1], bl.double() if bl is not None else None, EPS,
                              rms, rr)  # fmt: skip
    else:  # torch's own kernels in the input's precision (weight and bias cast to it)
        inp = leaves[0] + r if r is not None else leaves[0]
        wd, bd = leaves[1].to(x.dtype), bl.to(x.dtype) if bl is not None else None
        y = F.rms_norm(inp, (n,), wd, EPS) if rms else F.layer_norm(inp, (n,), wd, bd, EPS)
    need = [*leaves, *([bl] if bl is not None else [])]
    g = torch.autograd.grad(y, need, gy.to(y.dtype))
    dx = g[0] + (gh.to(g[0].dtype) if gh is not None else 0)  # h's gradient reaches x as is
    return [y.detach(), dx, *g[1:]]


def check(lib, x, w, b, r, rms, sm_count=1, want_paths=None):
    """Both passes of the kernels against the reference; returns (fwd path, bwd path, parts)."""
    dtype = x.dtype
    y, h, mean, rstd, fwd_path = forward(lib, x, w, b, r, rms, sm_count)
    inp = h if r is not None else x
    if r is not None:  # h = x + residual in the math type, rounded to x's dtype: exact
        assert torch.equal(h, reference.norm(x, None, None, EPS, rms, r)[1])
    # The saved statistics, in the math type; fp32 ones judged against eager fp32's (LayerNorm:
    # torch's native_layer_norm's own mean and rstd)
    stats = []
    for t in (inp.double(), inp.to(math_dtype(dtype))):
        if rms:
            stats.append((None, torch.rsqrt(t.pow(2).mean(-1) + EPS)))
        else:
            _, m, s = torch.native_layer_norm(t, (t.shape[-1],), None, None, EPS)
            stats.append((m.squeeze(-1), s.squeeze(-1)))
    eager = stats[1] if dtype != torch.float64 else (None, None)
    assert_parity(rstd, stats[0][1], eager[1], "rstd")
    if not rms:
        assert_parity(mean, stats[0][0], eager[0], "mean")
    gy = torch.randn(x.shape, dtype=torch.float64)
    gh = torch.randn(x.shape, dtype=torch.float64) if r is not None else None
    dx, dw, db, bwd_path, parts = backward(
        lib, gy.to(dtype), gh.to(dtype) if gh is not None else None, inp, w, mean, rstd, rms,
        b is not None, sm_count,
    )  # fmt: skip
    got = [y, dx, dw, *([db] if b is not None else [])]
    want = grads(x, w, b, r, rms, gy, gh, torch.float64)
    base = grads(x, w, b, r, rms, gy, gh, dtype) if dtype in ROUNDED else [None] * len(want)
    names = ["y", "dx", "dweight", "dbias"]
    for name, g, wt, bs in zip(names, got, want, base, strict=False):
        assert_parity(g, wt, bs, f"cuda-host norm {name}", dtype=dtype)
    if want_paths is not None:
        assert (fwd_path, bwd_path) == want_paths
    return fwd_path, bwd_path, parts


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1 and 7: shorter than a vector (element-wise); 33: past a warp's 32 lanes (2 per lane); 256:
# whole vectors, the warp kernels with packed loads; 1025: odd, a block per row element-wise;
# 2048: a block per row with packed loads; 4099: odd and past the register kernels' 2048
# elements, the looped kernels element-wise. The looped kernels with packed loads: 16392 below.
COLS = [1, 7, 33, 256, 1025, 2048, 4099]
# weight only; LayerNorm: weight + bias; residual alone; weight (+ bias) + residual; fp32 weight
# (and bias) under a 16-bit x + residual
VARIANTS = ["plain", "weight", "affine", "residual", "affine_residual", "mixed_residual"]


def grid():
    for dtype in DTYPES:
        for rms in (False, True):
            for variant in VARIANTS:
                if variant == "mixed_residual" and dtype not in LOW:
                    continue  # fp32/fp64 weights of fp32/fp64 x: the "affine_residual" case
                if variant == "affine" and rms:
                    continue  # RMSNorm has no bias: the "weight" case
                yield pytest.param(dtype, rms, variant, id=f"{dtype}-{'rms' if rms else 'ln'}-"
                                   f"{variant}")  # fmt: skip


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize(("dtype", "rms", "variant"), list(grid()))
def test_norm_kernels_match_reference(lib, dtype, rms, variant, cols):
    # 5 rows: blocks of the warp kernels with idle warps; bwd partial rows of 2 rows and of 1
    check(lib, *make_case(variant, 5, cols, dtype, rms), rms,
          want_paths=expected_paths(cols, dtype))  # fmt: skip


def test_the_grid_reaches_every_kernel():
    # The plan's thresholds: each dtype's row lengths (with 16392 below) take every path.
    for dtype in DTYPES:
        paths = {expected_paths(n, dtype) for n in [*COLS, 16392]}
        assert {p[0] for p in paths} == {WARP, BLOCK, LOOPED}, dtype
        assert {p[1] for p in paths} == {WARP, BLOCK, LOOPED}, dtype


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_looped_kernels_with_vectors(lib, dtype, rms):
    # 16392 = 2049 vectors of 8 16-bit values (past the register kernels' 2048), 4098 of 4 fp32,
    # 8196 of 2 fp64: the looped kernels' packed loads, in every dtype
    check(lib, *make_case("affine_residual", 3, 16392, dtype, rms), rms,
          want_paths=(LOOPED, LOOPED))  # fmt: skip


# (rows, cols): more rows than the grid of one SM holds, so that every kernel's grid-stride loop
# runs and the backward splits the rows over 4 partial rows (the looped path: >= 8 rows each, its
# column tiles over fewer blocks than tiles).
@pytest.mark.parametrize(("rows", "cols", "paths"), [(300, 33, (WARP, WARP)),
                                                     (300, 1025, (BLOCK, BLOCK)),
                                                     (40, 4099, (LOOPED, LOOPED))])  # fmt: skip
@pytest.mark.parametrize("rms", [False, True])
def test_many_rows_grid_stride_and_partial_rows(lib, rows, cols, paths, rms):
    x, w, b, r = make_case("affine_residual", rows, cols, torch.float32, rms)
    _, _, parts = check(lib, x, w, b, r, rms, want_paths=paths)
    assert parts == 4


# LayerNorm rows whose mean dwarfs their spread: the kernels' centred second pass keeps the
# variance (a one-pass E[h^2] - E[h]^2 would cancel to noise). Judged against eager fp32.
ROW_STATS = {
    "offset": lambda x: 3000 + x,  # mean 3000, std 1
    "tiny_spread": lambda x: 1e4 + 1e-2 * x,  # std near fp32's resolution at 1e4
}


@pytest.mark.parametrize("cols", [7, 1025, 4099])  # warp, block and looped kernels
@pytest.mark.parametrize("rows", list(ROW_STATS))
def test_layer_norm_rows_far_from_zero(lib, rows, cols):
    x = ROW_STATS[rows](torch.randn(5, cols, dtype=torch.float64)).float()
    w = torch.randn(cols) * 0.5 + 1
    b = torch.randn(cols)
    check(lib, x, w, b, None, False, want_paths=expected_paths(cols, torch.float32))


# Every norm kernel under the layer's shared-memory race check (~20 us a shared access: short
# rows). A warp per row (33; 5 rows: the backward's warps combined in dynamic shared memory; 256
# bf16: packed loads), a block per row (129: the shortest row past the warp kernels), looped
# (2049: the shortest past the register kernels); the partial-sum kernel after each backward.
@pytest.mark.parametrize(("rows", "cols", "dtype", "rms", "variant"),
                         [(5, 33, torch.float32, False, "affine_residual"),
                          (5, 256, torch.bfloat16, True, "weight"),
                          (2, 129, torch.float32, True, "residual"),
                          (2, 2049, torch.float32, False, "weight")])  # fmt: skip
def test_norm_kernels_pass_the_race_check(lib, rows, cols, dtype, rms, variant):
    with race_check(lib) as recorded:
        check(lib, *make_case(variant, rows, cols, dtype, rms), rms,
              want_paths=expected_paths(cols, dtype))  # fmt: skip
        assert recorded() > 0  # the check saw the kernels' shared accesses
