"""The host execution layer's harness library (tools/cuda_host/harness*.cpp: the CUDA kernels of
csrc/cuda/*_kernels.cuh compiled with g++, see docs/cuda-host.md), built once per source content
and loaded with ctypes by tests/test_cuda_host.py and tests/test_cuda_host_norm.py."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "tools" / "cuda_host"
KERNELS = ROOT / "csrc" / "cuda"
UNITS = [LAYER / "harness.cpp", LAYER / "harness_norm.cpp", LAYER / "harness_attention.cpp"]
SOURCES = [
    *UNITS,
    LAYER / "cuda_host.h",
    LAYER / "cuda_host_race.h",
    LAYER / "cuda_host_smem_symbols.h",
    LAYER / "harness.h",
    LAYER / "tensor_core.h",
    KERNELS / "device.cuh",
    KERNELS / "softmax_kernels.cuh",
    KERNELS / "norm_kernels.cuh",
    KERNELS / "mma.cuh",
    KERNELS / "attention_kernels.cuh",
]
# -O1: the kernels' code as an optimiser sees it, at a fraction of -O3's compile time.
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
# More flags, e.g. "-fsanitize=address,undefined" (then run pytest with LD_PRELOAD of libasan and
# ASAN_OPTIONS=detect_leaks=0: see docs/cuda-host.md).
FLAGS += os.environ.get("FASTATTN_CUDA_HOST_FLAGS", "").split()
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ERR_LEN = 2048


def build() -> Path:
    """The harness library, compiled once per source content into .cache/cuda_host (its
    translation units in parallel, then linked)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "the CUDA host tests need a C++ compiler (g++) on PATH or in $CXX"
    include = Path(torch.__file__).parent / "include"
    key = hashlib.sha256()
    for p in SOURCES:
        key.update(p.read_bytes())
    key.update(" ".join([cxx, *FLAGS, torch.__version__]).encode())
    out = ROOT / ".cache" / "cuda_host" / f"harness-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # xdist workers may build at once
    objs = [tmp.with_suffix(f".{os.getpid()}.{u.stem}.o") for u in UNITS]
    cmds = [
        [cxx, *FLAGS, f"-I{include}", f"-I{LAYER}", f"-I{KERNELS}", "-c", str(u), "-o", str(o)]
        for u, o in zip(UNITS, objs, strict=True)
    ]
    cmds.append([cxx, *FLAGS, "-shared", *map(str, objs), "-o", str(tmp)])
    try:
        procs = [subprocess.Popen(c, stderr=subprocess.PIPE, text=True) for c in cmds[:-1]]
        for cmd, proc in zip(cmds, procs, strict=False):
            _, stderr = proc.communicate()
            assert proc.returncode == 0, f"harness build failed:\n{' '.join(cmd)}\n{stderr[-4000:]}"
        res = subprocess.run(cmds[-1], capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"harness link failed:\n{res.stderr[-4000:]}"
        os.replace(tmp, out)
    finally:
        for o in objs:
            o.unlink(missing_ok=True)
    return out


def load() -> ctypes.CDLL:
    return ctypes.CDLL(str(build()))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def check_rc(rc: int, err: ctypes.Array) -> None:
    if rc != 0:
        raise RuntimeError(err.value.decode())


def set_race_check(lib: ctypes.CDLL, on: bool) -> int:
    """Turns the layer's shared-memory race check on or off for the launches that follow;
    returns the shared-memory accesses it recorded since the previous call."""
    recorded, err = ctypes.c_int64(0), ctypes.create_string_buffer(ERR_LEN)
    check_rc(lib.fa_set_race_check(int(on), ctypes.byref(recorded), err, ERR_LEN), err)
    return recorded.value


@contextlib.contextmanager
def race_check(lib: ctypes.CDLL, on: bool = True) -> Iterator[Callable[[], int]]:
    """The race check on (or off) inside the block, back to FASTATTN_CUDA_HOST_RACE's setting
    after; yields a function that returns the accesses it recorded since its previous call. Skips
    under AddressSanitizer, which owns SIGSEGV (the layer refuses the check there)."""
    if on and any(f.startswith("-fsanitize") and "address" in f for f in FLAGS):
        pytest.skip("the shared-memory race check is unavailable under AddressSanitizer")
    set_race_check(lib, on)
    try:
        yield lambda: set_race_check(lib, on)
    finally:
        set_race_check(lib, os.environ.get("FASTATTN_CUDA_HOST_RACE") == "1")
