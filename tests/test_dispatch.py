"""Backend selection, the extension report, and behaviour without the compiled extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import _extension, dispatch


def test_extension_is_built():
    # The test run must exercise the C++ CPU kernels: a missing build fails here, not skips.
    info = _extension.build_info()
    assert _extension.error() is None and info["version"] == fastattn.__version__
    assert info["cpu_isa"] in info["cpu_isas_compiled"].split(",")


# The CPU kernels take these four dtypes (fp32 math; fp64 for float64), and the build says so.
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Floating dtypes no compiled kernel takes: auto sends them to the reference backend.
OTHER_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def test_build_reports_the_cpu_dtypes():
    names = _extension.build_info()["cpu_dtypes"].split(",")
    assert {getattr(torch, n) for n in names} == set(CPU_DTYPES)
    # The CUDA attention kernels' (tensor cores: 16-bit only), which dispatch reads.
    cuda = _extension.build_info()["cuda_attention_dtypes"].split(",")
    assert {getattr(torch, n) for n in cuda} == {torch.float16, torch.bfloat16}


def _every_op(dtype, backend):
    """Each public op once on small CPU inputs of ``dtype`` (attention with a mask in ``dtype``),
    the same inputs on every call."""
    torch.manual_seed(0)
    x = torch.randn(3, 8).to(dtype)
    q = torch.randn(1, 2, 3, 8).to(dtype)
    bias = torch.randn(1, 1, 3, 3).to(dtype)
    return [
        fastattn.softmax(x, mask=x, backend=backend),
        fastattn.layer_norm(x, 8, torch.ones(8).to(dtype), backend=backend),
        fastattn.rms_norm(x, 8, residual=x, backend=backend)[0],
        fastattn.attention(q, q, q, attn_mask=bias, backend=backend),
    ]


@pytest.mark.parametrize("dtype", CPU_DTYPES + OTHER_DTYPES, ids=str)
def test_auto_takes_the_cpu_kernels_where_they_serve_else_the_reference(monkeypatch, dtype):
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    served = dtype in CPU_DTYPES
    for op in ("softmax", "layer_norm", "rms_norm", "attention"):
        assert dispatch.select("auto", torch.device("cpu"), dtype, op) == (
            "cpu" if served else "reference"
        )
    got = _every_op(dtype, "auto")  # never raises: what the CPU kernels refuse runs eagerly
    for a, b in zip(got, _every_op(dtype, "reference"), strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        if not served:  # the reference backend's own result, bit for bit
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if not served:
        with pytest.raises(RuntimeError, match=f"backend 'cpu' cannot run this call: .*{dtype}"):
            fastattn.softmax(torch.randn(2, 3).to(dtype), backend="cpu")
        with pytest.raises(RuntimeError, match="the CPU kernels take float32, bfloat16, float16"):
            torch.ops.fastattn.softmax(torch.randn(2, 3).to(dtype), None, 1.0, False, False)


@pytest.mark.parametrize("op", ["attention", "paged_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_attention_serves_16_bit_dtypes_only(monkeypatch, dtype, op):
    """As a CUDA build would see it (faked: no CUDA here): the CUDA C++ attention (dense and
    paged) takes fp16 / bf16, so auto passes over it for fp32 attention (to the reference when
    Triton is out) and names the reason when asked for it; softmax's CUDA kernels still take
    fp32."""
    monkeypatch.setattr(dispatch, "_CUDA_BUILT", True)
    monkeypatch.setattr(dispatch, "TRITON_ERROR", "faked away")
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    dispatch._auto.cache_clear()
    try:
        gpu, cpp = torch.device("cuda"), frozenset({"cuda"})
        low = dtype != torch.float32
        assert dispatch.select("auto", gpu, dtype, op, cpp) == ("cuda" if low else "reference")
        assert dispatch.select("auto", gpu, dtype, "softmax", cpp) == "cuda"
        if not low:
            with pytest.raises(RuntimeError, match="take bfloat16, float16, not torch.float32"):
                dispatch.select("cuda", gpu, dtype, op, cpp)
    finally:
        dispatch._auto.cache_clear()


def test_backends_report():
    rep = fastattn.backends()
    assert set(rep["backends"]) == {"triton", "cuda", "cpu", "reference"}
    assert rep["backends"]["cpu"]["available"] and rep["backends"]["reference"]["available"]
    if not torch.cuda.is_available():
        assert not rep["backends"]["cuda"]["available"]
        assert "cuda" in rep["backends"]["cuda"]["reason"].lower()
    assert rep["torch"] == torch.__version__
    # The CUDA C++ attention's backward is Triton's, reported only where the CUDA kernels exist.
    built = bool(rep["extension"].get("cuda"))
    assert (rep["cuda_attention_backward"] is None) == (not built)


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    assert dispatch.select("auto", torch.device("cpu"), torch.float32, "softmax") == "cpu"


def test_env_var_chooses_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert dispatch.select("auto", torch.device("cpu"), torch.float32, "softmax") == "reference"
    assert dispatch.select("cpu", torch.device("cpu"), torch.float32, "softmax") == "cpu"
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        fastattn.softmax(torch.randn(2, 3))


def test_triton_refuses_float64():
    with pytest.raises(RuntimeError, match="float64"):
        fastattn.softmax(torch.randn(2, 3, dtype=torch.float64), backend="triton")


def test_import_without_extension_warns_once_and_falls_back():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["fastattn._C"] = None  # as if the extension were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, fastattn
            x = torch.randn(3, 5)
            y = fastattn.softmax(x)
            fastattn.softmax(x)
        msgs = [str(w.message) for w in caught if "fastattn._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert torch.allclose(y, torch.softmax(x, -1))
        rep = fastattn.backends()["backends"]
        assert not rep["cpu"]["available"] and "unavailable" in rep["cpu"]["reason"]
        try:
            fastattn.softmax(x, backend="cpu")
        except RuntimeError as e:
            assert "compiled extension is unavailable" in str(e)
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


ISA_CHECK = textwrap.dedent(
    """
    import os, torch, fastattn
    from fastattn import _extension
    assert _extension.build_info()["cpu_isa"] == os.environ["FASTATTN_CPU_ISA"]
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cols in (1, 7, 100, 1025, 70001):  # tails, a vector multiple, the looped path
            x = (torch.randn(3, cols) * 4).to(dtype).requires_grad_()
            mask = torch.rand(cols) < 0.8
            for log in (False, True):
                y = fastattn.softmax(x, mask=mask, scale=0.7, log=log, backend="cpu")
                r = fastattn.softmax(x.double(), mask=mask, scale=0.7, log=log,
                                     backend="reference")
                fin = torch.isfinite(r)
                assert torch.equal(torch.isfinite(y), fin)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                err = ((y.double() - r)[fin].abs() / (1 + r[fin].abs())).max().item()
                assert err < tol, (dtype, cols, log, err)
            w = torch.randn(cols)
            for fn in (fastattn.layer_norm, fastattn.rms_norm):
                y = fn(x.detach(), cols, w, eps=1e-5, backend="cpu")
                r = fn(x.detach().double(), cols, w.double(), eps=1e-5, backend="reference")
                err = ((y.double() - r).abs() / (1 + r.abs())).max().item()
                assert err < (1e-5 if dtype == torch.float32 else 2e-2), (fn, dtype, cols, err)
    print("OK")
    """
)


def _supported_isas() -> list[str]:
    compiled = _extension.build_info().get("cpu_isas_compiled", "scalar").split(",")
    best = _extension.build_info().get("cpu_isa", "scalar")
    order = ["scalar", "avx2", "avx512", "avx512bf16"]  # each tier at or below this CPU's
    return [i for i in order if i in compiled and order.index(i) <= order.index(best)]


def _check_in_fresh_process(code: str, env: dict[str, str], *args: str) -> None:
    """Run ``code`` with the extra environment ``env`` (read once per process by the kernels)."""
    out = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("isa", _supported_isas())
def test_every_cpu_isa_path_matches_reference(isa):
    # The main grid runs the best path only; force each lower one in a fresh process.
    _check_in_fresh_process(ISA_CHECK, {"FASTATTN_CPU_ISA": isa})


# The norm kernels' non-temporal-store output path (y, h, dx; a streamed h is re-read from a
# per-thread fp32 copy) is taken only for outputs of 8 MiB and more, so the parity grid with
# its small inputs never reaches it. FASTATTN_CPU_STREAM_BYTES=0 forces it for every output; the
# threshold is read once per process, hence a fresh one. The checks are test_norm's own.
STREAM_CHECK = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_norm import VARIANTS, check, make_case
    torch.manual_seed(0)
    for rms in (False, True):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for variant in VARIANTS:
                # 768: whole vectors; 1000: a tail; 65536: the looped (long-row) path
                for lead, hidden in (((3, 17), 768), ((5,), 1000), ((1,), 65536)):
                    check("cpu", *make_case(variant, lead, hidden, dtype, rms), rms)
    print("OK")
    """
)


def _stream_paths() -> list[str]:
    # The vector tiers (the scalar one's "stream" is a plain store); avx512 is also the plain
    # AVX-512 bf16 conversion that the avx512bf16 tier replaces.
    return [i for i in _supported_isas() if i != "scalar"]


@pytest.mark.parametrize("path", _stream_paths())
def test_norm_streaming_stores_match_reference(path):
    env = {"FASTATTN_CPU_ISA": path, "FASTATTN_CPU_STREAM_BYTES": "0"}
    _check_in_fresh_process(STREAM_CHECK, env, os.path.dirname(os.path.abspath(__file__)))


# The attention kernels have a path per ISA (and, for bf16, one with vdpbf16ps and one without;
# fp16 takes the fp32 products on every tier, the avx512bf16 one included):
# the main suite runs the best; each other one is checked here with test_attention's own checks.
ATTN_ISA_CHECK = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_attention import check, make_qkv, mask_of
    from fastattn import _extension
    assert _extension.build_info()["cpu_isa"] == os.environ["FASTATTN_CPU_ISA"]
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # GQA with odd lengths and a non-power-of-two head dim; a padded, masked batch; dropout;
        # a decode row against many keys; a head dim of 256.
        check("cpu", *make_qkv(2, 4, 2, 37, 70, 40, dtype), causal=True)
        check("cpu", *make_qkv(2, 4, 1, 33, 65, 64, dtype), mask_of("key_padding", 2, 4, 33, 65))
        check("cpu", *make_qkv(1, 4, 4, 20, 50, 32, dtype), mask_of("float_grad", 1, 4, 20, 50),
              dropout_p=0.2)
        check("cpu", *make_qkv(1, 8, 2, 1, 700, 128, dtype))
        check("cpu", *make_qkv(1, 2, 2, 9, 17, 256, dtype), causal=True)
    print("OK")
    """
)


# On the avx512bf16 tier both bf16 attention paths, whichever the default takes there (the
# vdpbf16ps pairs are off by default on Intel): "-pairs" forces them on.
ATTN_PATHS = _supported_isas() + (["avx512bf16-pairs"] if "avx512bf16" in _supported_isas() else [])


@pytest.mark.parametrize("path", ATTN_PATHS)
def test_every_cpu_isa_path_of_attention_matches_reference(path):
    isa, _, pairs = path.partition("-")
    env = {"FASTATTN_CPU_ISA": isa} | ({"FASTATTN_CPU_AVX512BF16": "1"} if pairs else {})
    _check_in_fresh_process(ATTN_ISA_CHECK, env, os.path.dirname(os.path.abspath(__file__)))


# fp32 attention by FlashAttention's rule with test_attention's tight atol, on each ISA path (the
# main suite runs the best one): a representative part of test_parity_grid_fp32_flash_rule.
ATTN_FP32_CHECK = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_attention import fp32_flash_rule_case
    from fastattn import _extension
    assert _extension.build_info()["cpu_isa"] == os.environ["FASTATTN_CPU_ISA"]
    for i, (sq, sk) in enumerate([(1, 1), (7, 7), (113, 1025), (1023, 1023), (1025, 113),
                                  (1, 1025)]):
        for j, kind in enumerate(("plain", "causal", "masked")):
            if sq == 1 and kind != "plain":
                continue
            torch.manual_seed(0)
            h, hkv = (2, 2) if kind == "plain" else (4, 2)
            fp32_flash_rule_case(1, h, hkv, sq, sk, (40, 64, 96, 128)[(i + j) % 4], kind)
    print("OK")
    """
)


@pytest.mark.parametrize("isa", _supported_isas())
def test_every_cpu_isa_path_of_fp32_attention_meets_the_flash_rule(isa):
    env = {"FASTATTN_CPU_ISA": isa}
    _check_in_fresh_process(ATTN_FP32_CHECK, env, os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_call_skips_autograd_only_when_it_has_nothing_to_record(grad):
    # opcall.call goes straight to the kernel when no gradient can flow; same result either way.
    q, k, v = (torch.randn(1, 2, 3, 8, requires_grad=True) for _ in range(3))
    x, w = torch.randn(3, 8), torch.rand(8, requires_grad=True)
    with torch.set_grad_enabled(grad):
        out = fastattn.attention(q, k, v, causal=True)
        y = fastattn.rms_norm(x, 8, w)
    assert (out.grad_fn is not None) == grad and (y.grad_fn is not None) == grad
    ref = fastattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, fastattn.rms_norm(x, 8, w, backend="reference"))
    if grad:
        (out.sum() + y.sum()).backward()
        assert q.grad is not None and w.grad is not None


def test_cpu_kernels_leave_the_threads_floating_point_mode_as_they_found_it():
    # The softmax and attention kernels flush subnormals (MXCSR FTZ/DAZ) while they run, on every
    # thread of their team: exp of masked scores would otherwise take a microcode assist per
    # element on Intel CPUs. Afterwards torch's own ops, on the same OpenMP threads, must still
    # produce and read subnormals.
    x = torch.randn(64, 4096)
    mask = torch.rand(4096) < 0.8
    q = torch.randn(2, 4, 256, 64)
    fastattn.softmax(x, mask=mask, backend="cpu")
    fastattn.softmax(x, mask=mask, backend="cpu").sum().item()
    out = fastattn.attention(q.requires_grad_(), q, q, attn_mask=mask[:256], backend="cpu")
    out.sum().backward()
    tiny = torch.full((1 << 22,), 1e-39)  # subnormal in fp32; large enough for every thread
    assert tiny[0].item() > 0
    assert (tiny * 1.0).min().item() > 0, "a thread was left flushing subnormals"
    assert (tiny * 0.5).min().item() > 0


def test_submodules_load_on_first_attribute_access():
    # As the README writes it: `import fastattn; fastattn.models.Transformer(...)`, in a fresh
    # process where nothing imported fastattn.models first.
    code = textwrap.dedent(
        """
        import sys, fastattn
        assert "fastattn.models" not in sys.modules
        m = fastattn.models.Transformer(fastattn.models.TransformerConfig(
            vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
        assert "models" in dir(fastattn) and fastattn.integrations.transformers
        assert callable(fastattn.reference.softmax)
        try:
            fastattn.nope
        except AttributeError as e:
            assert "nope" in str(e)
        else:
            raise AssertionError("fastattn.nope resolved")
        print("OK")
        """
    )
    _check_in_fresh_process(code, {})


def test_isa_tiers_are_one_enum_with_both_environment_variables():
    # FASTATTN_CPU_ISA names any tier (avx512bf16 included), unknown names warn and keep the best;
    # the older FASTATTN_CPU_AVX512BF16=0 caps the tier at avx512.
    info = _extension.build_info()
    assert info["cpu_isas_compiled"] == "avx512bf16,avx512,avx2,scalar"
    best = info["cpu_isa"]
    code = "import fastattn; print(fastattn.backends()['extension']['cpu_isa'])"

    def tier(env):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        return r.stdout.strip().splitlines()[-1], r.stderr

    got, err = tier({"FASTATTN_CPU_ISA": "bogus"})
    assert got == best and "not one of avx512bf16,avx512,avx2,scalar, auto" in err
    assert tier({"FASTATTN_CPU_ISA": "scalar"})[0] == "scalar"
    capped = {"avx512bf16": "avx512"}.get(best, best)
    assert tier({"FASTATTN_CPU_AVX512BF16": "0"})[0] == capped
    if best != "avx512bf16":  # asking for more than the CPU has warns and keeps the best
        got, err = tier({"FASTATTN_CPU_ISA": "avx512bf16"})
        assert got == best and "not supported by this CPU" in err
