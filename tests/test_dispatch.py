"""Backend selection, the extension report, and behaviour without the compiled extension."""

from __future__ import annotations

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


def test_backends_report():
    rep = fastattn.backends()
    assert set(rep["backends"]) == {"triton", "cuda", "cpu", "reference"}
    assert rep["backends"]["cpu"]["available"] and rep["backends"]["reference"]["available"]
    if not torch.cuda.is_available():
        assert not rep["backends"]["cuda"]["available"]
        assert "cuda" in rep["backends"]["cuda"]["reason"]
    assert rep["torch"] == torch.__version__


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
