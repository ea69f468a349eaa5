"""The CUDA C++ kernels (csrc/cuda/) on a device, for what only a device shows: launches on
torch's current stream, inputs on a device other than the current one, pointers that are not
16-byte aligned, partial warps, more than 2**31 elements, the shared-memory opt-in under threads,
and the float64 LayerNorm backward's mean. Skipped without a GPU and the CUDA build; the parity
grids of test_softmax.py / test_norm.py cover the rest."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import fastattn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not fastattn.backends()["backends"]["cuda"]["available"],
        reason="needs a CUDA device and the CUDA build of fastattn._C",
    ),
]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(
        got.double().cpu(), want.double().cpu(), atol=TOL[dtype], rtol=TOL[dtype]
    )


def _softmax_ref(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    z = x.double().cpu()
    if mask is not None:
        z = z + mask.double().cpu()
    return torch.softmax(z, -1)


def _misaligned(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    """A contiguous tensor whose data starts one element past a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n + 1, dtype=dtype, device=device)
    t = base[1:].view(shape)
    assert t.data_ptr() % 16 != 0
    return t


# ------------------------------------------------------------------- float64 norm backward
@pytest.mark.parametrize("n", [100, 200, 1000, 3001, 6000])  # warp, block and looped kernels
def test_float64_layer_norm_backward_is_float64_throughout(n):
    # |mean| / std = 1e5: a float32 mean would be off by up to ~4e-3 here, shifting every xhat by
    # as much, and a float32 rstd or dweight/dbias sum would cost ~6e-8 relative: the statistics
    # and the parameter gradients of float64 data are float64.
    x = (torch.randn(6, n, dtype=torch.float64) + 1e5).cuda().requires_grad_()
    w = torch.randn(n, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, device="cuda", requires_grad=True)
    _, _, mean, rstd = torch.ops.fastattn.norm(x.detach(), None, w.detach(), b.detach(), 1e-5,
                                               False)  # fmt: skip
    assert mean.dtype == rstd.dtype == torch.float64
    y = fastattn.layer_norm(x, n, w, b, 1e-5, backend="cuda")
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    xr, wr, br = (t.detach().cpu().requires_grad_() for t in (x, w, b))
    yr = F.layer_norm(xr, (n,), wr, br, 1e-5)
    dxr, dwr, dbr = torch.autograd.grad(yr, (xr, wr, br), g.cpu())
    _close(y, yr, torch.float64)
    for got, want in ((dx, dxr), (dw, dwr), (db, dbr)):
        assert got.dtype == torch.float64
        # x - mean cancels 5 digits: torch's own float64 result is good to ~1e-11 relative.
        torch.testing.assert_close(got.cpu(), want, atol=1e-9 * want.abs().max().item(), rtol=0)


# --------------------------------------------------------------------------------- streams
def test_kernels_run_on_the_current_stream():
    # On a side stream, x is only written after a long sleep: a kernel launched on any other
    # stream reads it before, and gets the wrong answer.
    src = torch.randn(64, 3000, device="cuda")
    w = torch.randn(3000, device="cuda")
    x = torch.zeros_like(src)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        y = fastattn.softmax(x, -1, backend="cuda")
        z = fastattn.layer_norm(x, 3000, w, None, 1e-5, backend="cuda")
    torch.cuda.synchronize()
    _close(y, _softmax_ref(src), torch.float32)
    _close(
        z, F.layer_norm(src.double().cpu(), (3000,), w.double().cpu(), None, 1e-5), torch.float32
    )


# ---------------------------------------------------------------- device other than current
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("cols", [300, 20000])  # warp kernel; block kernel with shared memory
def test_inputs_on_another_device(cols):
    with torch.cuda.device(0):
        x = torch.randn(33, cols, device="cuda:1", requires_grad=True)
        y = fastattn.softmax(x, -1, backend="cuda")
        assert y.device == x.device
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, g)
        w = torch.randn(cols, device="cuda:1", requires_grad=True)
        z = fastattn.layer_norm(x, cols, w, None, 1e-5, backend="cuda")
        (dw,) = torch.autograd.grad(z, w, g)
    torch.cuda.synchronize(1)
    xr = x.detach().double().cpu().requires_grad_()
    yr = torch.softmax(xr, -1)
    _close(y, yr, torch.float32)
    _close(dx, torch.autograd.grad(yr, xr, g.double().cpu())[0], torch.float32)
    wr = w.detach().double().cpu().requires_grad_()
    zr = F.layer_norm(xr, (cols,), wr, None, 1e-5)
    _close(z, zr, torch.float32)
    dwr = torch.autograd.grad(zr, wr, g.double().cpu())[0]
    torch.testing.assert_close(dw.double().cpu(), dwr, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------- shared memory under threads
def test_shared_memory_opt_in_is_thread_safe():
    # Long rows whose cached logits need different amounts (> 48 KiB) of dynamic shared memory,
    # from several threads at once: setting the kernel's limit per launch would let one thread
    # lower it under another's launch ("invalid argument").
    errors: list[Exception] = []
    inputs = {c: torch.randn(8, c, device="cuda") for c in (14000, 22000, 30000, 38000, 46000)}

    def work(cols: int) -> None:
        try:
            for _ in range(30):
                y = fastattn.softmax(inputs[cols], -1, backend="cuda")
            torch.cuda.synchronize()
            _close(y, _softmax_ref(inputs[cols]), torch.float32)
        except Exception as e:  # reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in inputs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ------------------------------------------------------------------------- alignment, tails
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cols", [1024, 6000])
def test_misaligned_inputs(dtype, cols):
    # Data one element past a 16-byte boundary (a view into a larger buffer): no vector packs.
    x = _misaligned((5, cols), dtype)
    mask = _misaligned((5, cols), torch.float32)
    y = fastattn.softmax(x, -1, mask=mask, backend="cuda")
    _close(y, _softmax_ref(x, mask), dtype)
    w, b, r = (
        _misaligned((cols,), dtype),
        _misaligned((cols,), dtype),
        _misaligned((5, cols), dtype),
    )
    z, h = fastattn.layer_norm(x, cols, w, b, 1e-5, residual=r, backend="cuda")
    hr = (x.double() + r.double()).to(dtype).double().cpu()
    _close(h, hr, dtype)
    zr = F.layer_norm(hr, (cols,), w.double().cpu(), b.double().cpu(), 1e-5)
    _close(z, zr, dtype)


@pytest.mark.parametrize("cols", [1, 3, 17, 31, 33, 1023, 4097])  # tails; rows of partial warps
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_row_tails_and_partial_warps(rows, cols):
    x = torch.randn(rows, cols, device="cuda", requires_grad=True)
    y = fastattn.softmax(x, -1, backend="cuda")
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().double().cpu().requires_grad_()
    yr = torch.softmax(xr, -1)
    _close(y, yr, torch.float32)
    _close(dx, torch.autograd.grad(yr, xr, g.double().cpu())[0], torch.float32)
    w = torch.randn(cols, device="cuda", requires_grad=True)
    z = fastattn.rms_norm(x, cols, w, 1e-6, backend="cuda")
    dxz, dw = torch.autograd.grad(z, (x, w), g)
    wr = w.detach().double().cpu().requires_grad_()
    zr = F.rms_norm(xr, (cols,), wr, 1e-6)
    dxzr, dwr = torch.autograd.grad(zr, (xr, wr), g.double().cpu())
    _close(z, zr, torch.float32)
    torch.testing.assert_close(dxz.double().cpu(), dxzr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw.double().cpu(), dwr, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------- 2**31 elements
@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 << 30,
    reason="needs 40 GiB of GPU memory",
)
def test_more_than_2_31_elements():
    rows, cols = (1 << 21) + 3, 1024  # 2**31 + 3072 elements: offsets past int32
    x = torch.randn(rows, cols, dtype=torch.float16, device="cuda")
    y = fastattn.softmax(x, -1, backend="cuda")
    for sl in (slice(0, 2), slice(rows - 3, rows)):
        _close(y[sl], _softmax_ref(x[sl]), torch.float16)
    del y
    z = fastattn.rms_norm(x, cols, None, 1e-6, backend="cuda")
    for sl in (slice(0, 2), slice(rows - 3, rows)):
        _close(z[sl], F.rms_norm(x[sl].double().cpu(), (cols,), None, 1e-6), torch.float16)
