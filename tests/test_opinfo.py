"""Every sample torch's OpInfo generators produce for softmax, log_softmax, layer_norm and
rms_norm (``torch.testing._internal.common_methods_invocations``), run through fastattn's
drop-in the way torch's own call takes it (positional and keyword forms alike): the result by the
FlashAttention rule against float64, every gradient too, and each of torch's error inputs refused
with torch's exception type. Also the argument names and the softmax edge cases."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity

import fastattn

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (OpInfo name, variant, the fastattn drop-in called with the same arguments)
OPS = [
    ("softmax", "", fastattn.softmax),
    ("softmax", "with_dtype", fastattn.softmax),
    ("log_softmax", "", functools.partial(fastattn.softmax, log=True)),
    ("log_softmax", "with_dtype", functools.partial(fastattn.softmax, log=True)),
    ("nn.functional.layer_norm", "", fastattn.layer_norm),
    ("nn.functional.rms_norm", "", fastattn.rms_norm),
]


@functools.cache
def _opinfo(name: str, variant: str):
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == name and o.variant_test_name == variant]
    return op


def _upcast(x):
    return (
        x.detach().double().requires_grad_(x.requires_grad)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
        else x
    )


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "variant", "fn"), OPS, ids=[f"{o[0]}-{o[1]}" for o in OPS])
def test_every_sample_matches_torch(name, variant, fn, dtype, backend):
    op = _opinfo(name, variant)
    if dtype not in op.supported_dtypes("cpu"):
        pytest.skip(f"torch's {name} does not take {dtype} on the CPU")
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    for s in samples:
        args, kw = s.args, s.kwargs
        want = op(s.input, *args, **kw)
        got = fn(s.input, *args, **kw, backend=backend)
        x64 = _upcast(s.input)
        args64 = tuple(_upcast(a) for a in args)
        kw64 = {k: v for k, v in kw.items() if k != "dtype"}  # the float64 oracle keeps float64
        want64 = op(x64, *args64, **kw64)
        what = f"{name} {tuple(s.input.shape)} {args} {kw}"
        assert got.dtype == want.dtype, what
        assert_parity(got, want64, want, what=what, dtype=want.dtype)
        if not got.requires_grad or got.numel() == 0:
            continue
        g = torch.randn_like(want)
        inputs = [t for t in (s.input, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
        inputs64 = [t for t in (x64, *args64) if isinstance(t, torch.Tensor) and t.requires_grad]
        mine = torch.autograd.grad(got, inputs, g)
        eager = torch.autograd.grad(want, inputs, g)
        ref = torch.autograd.grad(want64, inputs64, g.double())
        for i, (a, b, c) in enumerate(zip(mine, ref, eager, strict=True)):
            assert_parity(a, b, c, what=f"{what} grad {i}", dtype=a.dtype)


# The OpInfos among OPS that list error inputs (in torch 2.13: rms_norm's alone).
ERROR_OPS = [o for o in OPS if o[0] == "nn.functional.rms_norm"]


@pytest.mark.parametrize(("name", "variant", "fn"), ERROR_OPS, ids=[o[0] for o in ERROR_OPS])
def test_every_error_input_is_refused_as_torch(name, variant, fn):
    op = _opinfo(name, variant)
    errors = list(op.error_inputs("cpu"))
    assert errors
    for e in errors:
        s = e.sample_input
        with pytest.raises(e.error_type):
            op(s.input, *s.args, **s.kwargs)  # the case holds for torch
        with pytest.raises(e.error_type, match="^fastattn"):
            fn(s.input, *s.args, **s.kwargs)


# ------------------------------------------------------------------------- argument names
# torch's documented signatures (parameter names and order, defaults aside); fastattn's own
# options follow, keyword-only.
TORCH_NAMES = [
    (fastattn.softmax, F.softmax, ["input", "dim", "_stacklevel", "dtype"]),
    (fastattn.layer_norm, F.layer_norm, ["input", "normalized_shape", "weight", "bias", "eps"]),
    (fastattn.rms_norm, F.rms_norm, ["input", "normalized_shape", "weight", "eps"]),
]


@pytest.mark.parametrize(
    ("ours", "theirs", "names"), TORCH_NAMES, ids=lambda x: getattr(x, "__name__", "")
)
def test_parameter_names_are_torchs(ours, theirs, names):
    assert list(inspect.signature(theirs).parameters) == names  # the expectation holds for torch
    params = inspect.signature(ours).parameters.values()
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == names
    assert all(p.kind is p.KEYWORD_ONLY for p in params if p.name not in names)


def test_keyword_calls_written_for_torch_work():
    x = torch.randn(4, 6)
    w, b = torch.randn(6), torch.randn(6)
    pairs = [
        (fastattn.softmax(input=x, dim=0, dtype=torch.float64), F.softmax(x.double(), dim=0)),
        (fastattn.layer_norm(input=x, normalized_shape=(6,), weight=w, bias=b, eps=1e-3),
         F.layer_norm(x.double(), (6,), w.double(), b.double(), 1e-3)),
        (fastattn.rms_norm(input=x, normalized_shape=[6], weight=w, eps=1e-3),
         F.rms_norm(x.double(), [6], w.double(), 1e-3)),
    ]  # fmt: skip
    for got, want in pairs:
        assert_parity(
            got,
            want,
            what=str(want.shape),
            dtype=torch.float64 if got.dtype == torch.float64 else None,
        )


# ------------------------------------------------------------------------ softmax edge cases
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_of_a_scalar_is_torchs(dim, log):
    x = torch.tensor(3.5, requires_grad=True)
    got = fastattn.softmax(x, dim, log=log)
    want = (torch.log_softmax if log else torch.softmax)(x, dim)
    assert got.shape == () and torch.equal(got, want)
    (g,) = torch.autograd.grad(got, x)
    assert torch.equal(g, torch.zeros(()))
    with pytest.raises(IndexError):
        fastattn.softmax(x, 1)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 1, 3, 5), (2, 2, 1, 3, 4)], ids=str)
def test_softmax_along_every_dim_of_every_rank(shape):
    x = torch.randn(shape)
    for dim in range(-len(shape), len(shape)):
        for log in (False, True):
            want = (torch.log_softmax if log else torch.softmax)(x.double(), dim)
            assert_parity(fastattn.softmax(x, dim, log=log), want, what=f"dim {dim}")


@pytest.mark.parametrize("src", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_softmax_casts_integer_and_bool_inputs_with_dtype(src):
    x = (torch.rand(3, 5) * 4).to(src)
    got = fastattn.softmax(x, 1, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert_parity(got, torch.softmax(x, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype="):
        fastattn.softmax(x, 1)  # as torch: an integer input needs dtype=


def test_softmax_positional_forms_of_torch():
    x = torch.randn(3, 5)
    want = torch.softmax(x.double(), 0)
    assert_parity(
        fastattn.softmax(x, 0, 3, torch.float64), want
    )  # F.softmax(input, dim, _stacklevel, dtype)
    assert_parity(fastattn.softmax(x, 0, torch.float64), want)  # torch.softmax(input, dim, dtype)


def test_softmax_dim_none_is_torchs_implicit_dim_with_its_warning():
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        got = fastattn.softmax(x, None)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        want = F.softmax(x.double(), None)  # noqa: F841 - torch's own pick: dim 0 for 3-D
    assert_parity(got, F.softmax(x.double(), 0))


def test_nn_softmax_on_a_scalar():
    x = torch.tensor(-2.0)
    with pytest.warns(UserWarning):
        want = torch.nn.Softmax()(x)
    with pytest.warns(UserWarning):
        got = fastattn.nn.Softmax()(x)
    assert torch.equal(got, want)


def test_deviation_softmax_default_dim_is_the_last():
    x = torch.randn(2, 3, 4)
    assert_parity(fastattn.softmax(x), torch.softmax(x.double(), -1))  # F.softmax(x): dim 0


NORM_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("w_dtype", NORM_DTYPES)
@pytest.mark.parametrize("x_dtype", NORM_DTYPES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_parameter_dtypes_accepted_and_refused_as_torch(op, x_dtype, w_dtype):
    """torch's layer_norm takes parameters in x's dtype, or float32 for bf16/fp16 x, and refuses
    the rest; its rms_norm takes any: fastattn the same, with torch's output dtype."""
    x, w = torch.randn(2, 3, dtype=x_dtype), torch.randn(3, dtype=w_dtype)
    theirs, ours = getattr(F, op), getattr(fastattn, op)
    args = (w, w) if op == "layer_norm" else (w,)
    try:
        want = theirs(x, (3,), *args)
    except RuntimeError as e:
        with pytest.raises(type(e)):
            ours(x, (3,), *args)
        return
    got = ours(x, (3,), *args)
    assert got.dtype == want.dtype
    assert_parity(got, theirs(x.double(), (3,), *(a.double() for a in args)), want)
