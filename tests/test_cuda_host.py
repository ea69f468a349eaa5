"""The CUDA C++ kernels (csrc/cuda/*_kernels.cuh) run on the CPU through the host execution layer
(tools/cuda_host/cuda_host.h, docs/cuda-host.md), against the float64 reference.

The layer compiles the kernels' own source with g++ and runs each thread of a block as a fiber,
barriers and warp collectives in lock-step. What it shows: the kernels' indexing, tails, masking,
reductions and barrier placement are right on these shapes, with the launch plan of the real
launchers; with the layer's shared-memory race check on, that no two threads of a block touch a
shared word between barriers, one of them writing. What it cannot show: timing, memory-model
effects beyond barriers, nvcc's code generation. Passing here is not a GPU run
(tests/test_cuda_device.py is).
"""

from __future__ import annotations

import ctypes
import re

import pytest
import torch
from conftest import ROUNDED, assert_parity
from cuda_host_lib import DTYPE_CODE, ERR_LEN, check_rc, load, ptr, race_check

from fastattn import reference

MASK_KIND = {None: 0, "bool": 1, "float": 2, "dtype": 3}  # MaskKind of softmax_kernels.cuh
SMEM_OPTIN = 227 * 1024  # sm_90's opt-in limit: rows up to ~14k fp32 logits are cached


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return load()


def mask_strides(mask: torch.Tensor, x: torch.Tensor) -> list[int]:
    """(s0, s1, s2, sc, d1, d2) of the mask broadcast to x, as softmax.cu's set_mask_args (the
    launcher's host code, which needs tensors and so is not compiled here) derives them."""
    full = mask.expand(x.shape)
    dims: list[list[int]] = []  # (size, stride) outer to inner, size-1 dims dropped
    for d in range(x.dim() - 1):
        sz, st = full.size(d), full.stride(d)
        if sz == 1:
            continue
        if dims and dims[-1][1] == st * sz:
            dims[-1] = [dims[-1][0] * sz, st]
        else:
            dims.append([sz, st])
    assert len(dims) <= 3, "more than three leading dims: the launcher would copy the mask"
    dims = [[1, 0]] * (3 - len(dims)) + dims
    return [dims[0][1], dims[1][1], dims[2][1], full.stride(-1), dims[1][0], dims[2][0]]


def forward(lib, x, mask=None, kind=None, scale=1.0, causal=False, log=False, smem=SMEM_OPTIN):
    """(y, path) of the CUDA forward kernels on x: path 0 warp kernel, 1 block kernel with the row
    cached in shared memory, 2 block kernel online (two passes)."""
    cols = x.shape[-1]
    y = torch.full_like(x, float("nan"))  # an element the kernel fails to write stays NaN
    if mask is not None and kind == "bool":
        mask = mask.to(torch.uint8)  # same bytes as torch.bool
    strides = (ctypes.c_int64 * 6)(*(mask_strides(mask, x) if mask is not None else [0] * 6))
    path, err = ctypes.c_int(-1), ctypes.create_string_buffer(ERR_LEN)
    rc = lib.fa_softmax_forward(
        DTYPE_CODE[x.dtype], ptr(x), ptr(y), ctypes.c_int64(x.numel() // cols),
        ctypes.c_int64(cols), ctypes.c_int64(x.shape[-2] if x.dim() >= 2 else 1),
        ctypes.c_double(scale), int(log), int(causal), ptr(mask), MASK_KIND[kind],
        ctypes.c_int64(mask.element_size() if mask is not None else 1), strides, 1, smem,
        ctypes.byref(path), err, ERR_LEN,
    )  # fmt: skip
    check_rc(rc, err)
    return y, path.value


def backward(lib, g, y, scale=1.0, log=False):
    """(dx, path) of the CUDA backward kernels: path 0 warp kernel, 1 block kernel."""
    cols = y.shape[-1]
    dx = torch.full_like(y, float("nan"))
    path, err = ctypes.c_int(-1), ctypes.create_string_buffer(ERR_LEN)
    rc = lib.fa_softmax_backward(
        DTYPE_CODE[y.dtype], ptr(g), ptr(y), ptr(dx), ctypes.c_int64(y.numel() // cols),
        ctypes.c_int64(cols), ctypes.c_double(scale), int(log), 1, ctypes.byref(path), err,
        ERR_LEN,
    )  # fmt: skip
    check_rc(rc, err)
    return dx, path.value


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1: a group of one lane; 7 and 33: tails shorter than a vector / past a warp's vectors (no
# vector loads); 64: whole vectors; 300: several vectors per lane (ITERS 4 for fp32); 1025: one
# past the warp kernels' limit, the block kernels.
COLS = [1, 7, 33, 64, 300, 1025]
VARIANTS = ["plain", "scale", "bool_mask", "float_mask", "dtype_mask", "causal", "log",
            "log_causal_mask"]  # fmt: skip


def make_case(variant: str, cols: int, dtype: torch.dtype):
    """x (2, 3, cols) of fresh logits, a mask (3, cols) broadcast over the batch whose row 0 is
    fully masked (plus random holes), and the op's arguments."""
    x = (torch.randn(2, 3, cols) * 4).to(dtype)
    mask, kind, kw = None, None, {}
    if variant == "scale":
        kw["scale"] = 0.37
    elif variant == "bool_mask":
        mask, kind, kw["scale"] = torch.rand(3, cols) < 0.8, "bool", 1.7
        mask[0] = False  # a fully masked row: zeros, not NaN
    elif variant in ("float_mask", "dtype_mask", "log_causal_mask"):
        mask = torch.randn(3, cols) * 2
        mask[torch.rand_like(mask) < 0.1] = float("-inf")
        mask[0] = float("-inf")
        kind = "float"
        if variant == "dtype_mask":
            mask, kind = mask.to(dtype), "dtype"
    if variant in ("causal", "log_causal_mask"):
        kw["causal"] = True
    if variant in ("log", "log_causal_mask"):
        kw["log"] = True
    return x, mask, kind, kw


def reference_pair(x, mask, kw, grad, opmath):
    """(y, dx) of the reference in `opmath` (float64: the oracle; x's dtype: eager's rounding)."""
    xr = (x.double() if opmath == torch.float64 else x).detach().requires_grad_()
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(xr.dtype)
    y = reference.softmax(xr, m, kw.get("scale", 1.0), kw.get("causal", False),
                          kw.get("log", False), opmath=opmath)  # fmt: skip
    (dx,) = torch.autograd.grad(y, xr, grad.to(y.dtype))
    return y.detach(), dx


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_kernels_match_reference(lib, dtype, cols, variant):
    x, mask, kind, kw = make_case(variant, cols, dtype)
    y, fwd_path = forward(lib, x, mask, kind, **kw)
    assert fwd_path == (1 if cols > 1000 else 0)  # the plan: the warp kernels up to 512 columns
    grad = torch.randn(x.shape, dtype=torch.float64)
    dx, bwd_path = backward(lib, grad.to(dtype), y, kw.get("scale", 1.0), kw.get("log", False))
    assert bwd_path == (1 if cols > 1000 else 0)
    y64, dx64 = reference_pair(x, mask, kw, grad, torch.float64)
    base = reference_pair(x, mask, kw, grad, dtype) if dtype in ROUNDED else (None, None)
    assert_parity(y, y64, base[0], f"cuda-host {variant} out", dtype=dtype)
    assert_parity(dx, dx64, base[1], f"cuda-host {variant} dx", dtype=dtype)
    if mask is not None:  # row 0 is fully masked in every batch: 0 (log: -inf), zero gradient
        dead = y[:, 0]
        assert torch.all(dead == (float("-inf") if kw.get("log") else 0.0))
        assert torch.all(dx[:, 0] == 0)


# (cols, smem): 1025 columns online (no shared memory to cache in); 16385 fp32 columns take 1024
# threads per block, cached (64 KiB) and online.
@pytest.mark.parametrize(("cols", "smem", "path"), [(1025, 0, 2), (16385, SMEM_OPTIN, 1),
                                                    (16385, 0, 2)])  # fmt: skip
@pytest.mark.parametrize("log", [False, True])
def test_block_kernels_cached_and_online(lib, cols, smem, path, log):
    x = torch.randn(2, cols) * 4
    x[1, ::3] = float("-inf")  # masked entries through the online path's running max
    y, got = forward(lib, x, log=log, smem=smem)
    assert got == path
    y64 = reference.softmax(x.double(), None, 1.0, False, log)
    assert_parity(y, y64, reference.softmax(x, None, 1.0, False, log), "cuda-host block")


def test_nan_row_propagates(lib):
    x = torch.randn(3, 1025)
    x[1, 5] = float("nan")
    for cols in (33, 1025):  # the warp kernel and the block kernel
        y, _ = forward(lib, x[:, :cols].contiguous())
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# --------------------------------------------------------------- the layer's own semantics


def selftest(lib, name: str, blocks: int, threads: int, arg: int, out: torch.Tensor) -> None:
    err = ctypes.create_string_buffer(ERR_LEN)
    check_rc(lib.fa_selftest(name.encode(), blocks, threads, arg, ptr(out), err, ERR_LEN), err)


def test_barrier_orders_the_block(lib):
    # Each thread reads its neighbour's slot after __syncthreads: a thread run to completion
    # before the next one starts would read slots not yet written.
    out = torch.full((3, 96), -1, dtype=torch.int32)
    selftest(lib, "barrier", 3, 96, 0, out)
    t = torch.arange(96)
    want = ((t + 1) % 96) * 10 + torch.arange(3)[:, None]
    assert torch.equal(out, want.int())


@pytest.mark.parametrize("width", [32, 8])
def test_warp_collectives_in_lockstep(lib, width):
    out = torch.full((64, 8), -1, dtype=torch.int32)
    selftest(lib, "warp", 1, 64, width, out)
    t = torch.arange(64)
    lane = t % 32
    lo = t - t % width  # the first lane of the thread's group of `width` (thread numbering)
    hi = lo + width - 1

    def own_if_out(src):  # CUDA: a source past the group's end gives the caller's own value
        return torch.where(src > hi, t, src)

    assert torch.equal(out[:, 0], own_if_out(t ^ 1).int())
    assert torch.equal(out[:, 1], own_if_out(t ^ 16).int())
    assert torch.equal(out[:, 2], own_if_out(t + 3).int())
    assert torch.equal(out[:, 3], torch.where(t - 2 < lo, t, t - 2).int())
    assert torch.equal(out[:, 4], (lo + 5 % width).int())
    ballot = sum(1 << i for i in range(32) if i % 3 == 0)
    assert torch.equal(out[:, 5], torch.full((64,), ballot, dtype=torch.int64).int())
    assert torch.equal(out[:, 6], (t >= 32).int())  # thread 40 is in the second warp
    assert torch.equal(out[:, 7], torch.zeros(64, dtype=torch.int32))  # lane 31 says no
    assert lane.max() == 31


def test_block_reduce_and_dynamic_shared_memory(lib):
    red = torch.full((256,), float("nan"))
    selftest(lib, "reduce", 2, 256, 0, red)  # common.cuh's block_reduce, 8 warps
    assert torch.all(red == sum(range(256)))
    dyn = torch.full((64,), float("nan"))
    selftest(lib, "dynamic_smem", 1, 64, 64, dyn)
    assert torch.equal(dyn, torch.arange(63, -1, -1, dtype=torch.float32))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("divergent_barrier", r"divergent __syncthreads.*exited after 0 barriers.*16 threads wait"),
        ("barrier_vs_shuffle", r"divergent __syncthreads.*32 threads wait"),
        ("divergent_shuffle", r"exited while lanes of its warp wait at a collective"),
        ("mixed_collectives", r"lanes of a warp at different collectives.*__shfl_down_sync"),
        ("partial_mask", r"only whole-warp masks are modelled"),
    ],
)
def test_divergence_is_reported_not_hung(lib, name, match):
    with pytest.raises(RuntimeError, match=match):
        selftest(lib, name, 1, 64, 0, torch.zeros(64, dtype=torch.int32))


# ------------------------------------------------------- the shared-memory race check (opt-in)

# (self-test, threads, arg, the report): each kernel races on purpose (harness.cpp); the report
# names both threads in their order, what they did, the word's array and offset, the interval.
WARP_READER = 4  # race_warp's arg: sync + 4 * the reading thread
RACY = [
    ("race_write_write", 64, 0, r"\(3,0,0\) wrote static __shared__ .*::race_write_write_kernel"
     r"\(int\*\)::s at byte offset 20, then thread \(40,0,0\) wrote it .*interval 0"),
    ("race_write_read", 64, 0, r"\(7,0,0\) wrote static __shared__ .*::race_write_read_kernel"
     r"\(int\*\)::s at byte offset 36, then thread \(50,0,0\) read it .*interval 1: after 1 "),
    ("race_read_write", 64, 0, r"\(2,0,0\) read static __shared__ .*::race_read_write_kernel"
     r"\(int\*\)::s at byte offset 4, then thread \(33,0,0\) wrote it .*interval 1"),
    # lanes 1 and 2 of a warp: nothing between, then a shuffle (which orders no memory)
    ("race_warp", 64, 0 + 2 * WARP_READER, r"\(1,0,0\) wrote .*race_warp_kernel.* byte offset 0, "
     r"then thread \(2,0,0\) read it .*lanes of one warp, no __syncwarp between"),
    ("race_warp", 64, 2 + 2 * WARP_READER, r"\(1,0,0\) wrote .*, then thread \(2,0,0\) read it "
     r".*no __syncwarp between"),
    # a __syncwarp orders lanes of its own warp only: thread 34 is in the second warp
    ("race_warp", 64, 1 + 34 * WARP_READER, r"\(1,0,0\) wrote .*, then thread \(34,0,0\) read "
     r"it with no __syncthreads between \(barrier interval 0: after 0 __syncthreads\)$"),
    ("race_dynamic", 64, 0, r"\(4,0,0\) wrote dynamic shared memory at byte offset 40, then "
     r"thread \(36,0,0\) wrote it"),
    # the layer's copy on behalf of thread 5 (smem_copy_as), by thread 0
    ("race_as", 64, 0, r"\(5,0,0\) wrote static __shared__ .*::race_as_kernel\(int\*, int\)::s at "
     r"byte offset 12, then thread \(9,0,0\) read it"),
]  # fmt: skip


def selftest_out(lib, name: str, blocks: int, threads: int, arg: int) -> torch.Tensor:
    out = torch.full((blocks * threads,), -7, dtype=torch.int32)
    selftest(lib, name, blocks, threads, arg, out)
    return out


@pytest.mark.parametrize(("name", "threads", "arg", "match"), RACY)
def test_race_check_reports_racy_kernels(lib, name, threads, arg, match):
    with race_check(lib), pytest.raises(RuntimeError, match="shared-memory race in block") as e:
        selftest_out(lib, name, 1, threads, arg)
    assert re.search(match, str(e.value)), str(e.value)


@pytest.mark.parametrize(("name", "threads", "arg", "match"), RACY)
def test_racy_kernels_pass_without_the_check(lib, name, threads, arg, match):
    with race_check(lib, on=False):  # opt-in: off (as by default), nothing is reported
        selftest_out(lib, name, 1, threads, arg)


def test_race_check_reports_dynamic_smem_past_its_size(lib):
    with race_check(lib), pytest.raises(RuntimeError, match=r"dynamic shared memory accessed past "
                                        r"its size: block \(0,0,0\) thread \(5,0,0\) writes byte "
                                        r"offset 64 of 64"):  # fmt: skip
        selftest_out(lib, "race_past", 1, 64, 16)


# (self-test, blocks, threads, arg, out): accesses ordered by barriers (3 blocks: the check's
# intervals restart with each block, which reuses the static arrays), a __syncwarp within a warp,
# atomics; each result checked as well.
ORDERED = [
    ("barrier", 3, 96, 0, ((torch.arange(96) + 1) % 96 * 10 + torch.arange(3)[:, None]).flatten()),
    ("race_warp", 1, 64, 1 + 2 * WARP_READER, torch.tensor([-7, -7, 11] + [-7] * 61)),
    ("race_as", 1, 64, 1, torch.tensor([-7] * 9 + [42] + [-7] * 54)),
    ("race_atomic", 1, 64, 0, torch.full((64,), 64)),
]


@pytest.mark.parametrize(("name", "blocks", "threads", "arg", "want"), ORDERED)
def test_race_check_passes_ordered_accesses(lib, name, blocks, threads, arg, want):
    with race_check(lib) as recorded:
        out = selftest_out(lib, name, blocks, threads, arg)
        assert recorded() > 0  # the check saw the shared accesses
    assert torch.equal(out, want.int())


def test_race_check_passes_block_reduce_and_dynamic_smem(lib):
    with race_check(lib) as recorded:
        test_block_reduce_and_dynamic_shared_memory(lib)
        assert recorded() > 0


# Every softmax kernel under the check (it costs ~20 us a shared access): the warp kernels
# (none), the block kernels cached in dynamic shared memory (fp32, bf16), and online.
@pytest.mark.parametrize(("dtype", "cols", "variant", "uses_smem"),
                         [(torch.float32, 33, "bool_mask", False),
                          (torch.float32, 1025, "float_mask", True),
                          (torch.bfloat16, 1025, "log_causal_mask", True)])  # fmt: skip
def test_softmax_kernels_pass_the_race_check(lib, dtype, cols, variant, uses_smem):
    with race_check(lib) as recorded:
        test_softmax_kernels_match_reference(lib, dtype, cols, variant)
        assert (recorded() > 0) == uses_smem


def test_softmax_online_block_kernel_passes_the_race_check(lib):
    with race_check(lib) as recorded:
        test_block_kernels_cached_and_online(lib, 1025, 0, 2, False)
        assert recorded() > 0  # the block reductions' static scratch
