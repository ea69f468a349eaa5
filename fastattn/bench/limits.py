"""This machine's facts and measured limits, for the "% peak" and "% BW" columns.

The limits are measured on this machine at the thread count in use, in a few seconds: ``FMA
GFLOP/s``, the fp32 FMA rate of fastattn's vector path in use (a register-only loop in the
extension, ``fastattn._C.fma_peak_gflops``: the compute peak that % peak is of), ``matmul
GFLOP/s`` of a large ``torch.mm`` (what a tuned BLAS reaches; the limit where the extension is
missing or on its scalar path), ``copy GB/s`` of ``dst.copy_(src)`` (bytes read plus bytes
written) and ``read GB/s`` of ``src.sum()``, on buffers well beyond the last-level cache. They
are cached in ``$XDG_CACHE_HOME/fastattn/machine_limits.json`` (default ``~/.cache``), keyed by
the CPU model, the thread count, torch's version and ATen's CPU capability; ``fastattn-bench
--remeasure`` measures again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "MATMUL_N",
    "Limits",
    "aten_capability",
    "cache_path",
    "cpu_flags",
    "cpu_isa",
    "cpu_model",
    "get",
    "measure",
]

MATMUL_N = 2048  # (n, n) @ (n, n): 17 GFLOP, large enough for oneDNN/MKL to reach its plateau
MIN_BUFFER_BYTES = 256 * 2**20
# Low-precision dtypes with a native arithmetic path, by the CPU flag that provides it. Without
# one, torch (and fastattn) compute bf16/fp16 in fp32, so the fp32 figure is their limit too.
NATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> str:
    """The vector path fastattn's CPU kernels use (the extension's choice, which honours
    ``FASTATTN_CPU_ISA``), with the variable when it is set; ``none`` without the extension."""
    from fastattn import _extension

    isa = str(_extension.build_info().get("cpu_isa", "none (extension not loaded)"))
    env = os.environ.get("FASTATTN_CPU_ISA")
    return f"{isa} (FASTATTN_CPU_ISA={env})" if env else isa


def aten_capability() -> str:
    """ATen's CPU kernel capability (e.g. AVX2, AVX512), which ``ATEN_CPU_CAPABILITY`` lowers."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size", encoding="utf-8") as f:
            text = f.read().strip().upper()
    except OSError:
        return 0
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    return int(digits) * scale if digits.isdigit() else 0


@dataclass
class Limits:
    """Measured at ``threads`` threads; GFLOP/s per dtype name, GB/s in 1e9 bytes per second."""

    cpu: str
    threads: int
    torch: str
    aten: str
    matmul_gflops: dict[str, float]  # measured dtypes only
    fma_gflops: float  # fp32 FMA peak of fastattn's vector path; 0 where not measurable
    copy_gbps: float
    read_gbps: float
    matmul_n: int
    buffer_mib: int
    seconds: float  # time the measurement took
    measured: str  # UTC date of the measurement
    cached: bool = field(default=False, compare=False)  # loaded from the cache file

    def peak_gflops(self) -> dict[str, float]:
        """The compute limit per dtype name: fp32's FMA peak (the matmul rate where it could not
        be measured); a low-precision dtype with native arithmetic its matmul rate, one without
        fp32's (it is computed in fp32)."""
        fp32 = self.fma_gflops or self.matmul_gflops.get("fp32", float("nan"))
        return {"fp32": fp32, **{n: self.matmul_gflops.get(n, fp32) for n in ("bf16", "fp16")}}

    def describe(self) -> str:
        """One line for the table headers."""
        mm = ", ".join(f"{n} {g:.1f}" for n, g in self.matmul_gflops.items())
        held = [n for n in ("bf16", "fp16") if n not in self.matmul_gflops]
        note = f" ({'/'.join(held)}: no native arithmetic here, held to fp32's)" if held else ""
        src = "cached" if self.cached else f"measured in {self.seconds:.1f} s"
        n, mib = self.matmul_n, self.buffer_mib
        fma = f"{self.fma_gflops:.1f}" if self.fma_gflops else "n/a (no vector path)"
        return (
            f"limits at {self.threads} threads ({src}, {self.measured}; --remeasure): "
            f"fp32 FMA GFLOP/s (register-only loop, {cpu_isa()} path) {fma}; "
            f"matmul GFLOP/s (torch.mm {n}x{n}x{n}, best of 3) {mm}{note}; "
            f"copy {self.copy_gbps:.1f} GB/s (dst.copy_(src), read+write, {mib} MiB each); "
            f"read {self.read_gbps:.1f} GB/s (src.sum())"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_gflops": self.peak_gflops()}


def _best_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: first touch of the pages, library initialisation
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _matmul_gflops(dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b, out = torch.randn_like(a), torch.empty_like(a)
    # best, not median: the limit is what the machine can do, not what it did on average
    return 2 * n**3 / _best_s(lambda: torch.mm(a, b, out=out), reps=3) / 1e9


def _fma_gflops(threads: int) -> float:
    from fastattn import _extension

    mod = _extension.load()
    return float(mod.fma_peak_gflops(threads, 5)) if mod is not None else 0.0


def _bandwidth_gbps(nbytes: int) -> tuple[float, float]:
    """(copy GB/s counting bytes read and written, read GB/s) on ``nbytes`` buffers."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)  # both written once: their pages are mapped before timing
    copy_s = _best_s(lambda: dst.copy_(src), reps=5)
    read_s = _best_s(lambda: src.sum(), reps=5)
    return 2 * nbytes / copy_s / 1e9, nbytes / read_s / 1e9


def measure(threads: int | None = None, matmul_n: int | None = None) -> Limits:
    """Measure the limits now at ``threads`` (default: torch's current count), with
    ``matmul_n`` (default :data:`MATMUL_N`) and buffers of at least :data:`MIN_BUFFER_BYTES`."""
    t_start = time.perf_counter()
    matmul_n = matmul_n or MATMUL_N
    prev = torch.get_num_threads()
    threads = threads or prev
    torch.set_num_threads(threads)
    try:
        flags = cpu_flags()
        names = ["fp32"] + [n for n, fl in NATIVE_FLAGS.items() if flags & set(fl)]
        fma = _fma_gflops(threads)  # first: before the matmul leaves its threads spinning
        gflops = {name: _matmul_gflops(_DTYPES[name], matmul_n) for name in names}
        nbytes = max(MIN_BUFFER_BYTES, 8 * _l3_bytes())
        copy_gbps, read_gbps = _bandwidth_gbps(nbytes)
    finally:
        torch.set_num_threads(prev)
    return Limits(
        cpu=cpu_model(),
        threads=threads,
        torch=torch.__version__,
        aten=aten_capability(),
        matmul_gflops=gflops,
        fma_gflops=fma,
        copy_gbps=copy_gbps,
        read_gbps=read_gbps,
        matmul_n=matmul_n,
        buffer_mib=nbytes // 2**20,
        seconds=time.perf_counter() - t_start,
        measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastattn", "machine_limits.json")


def _key(threads: int) -> str:
    return f"{cpu_model()} | threads {threads} | torch {torch.__version__} | {aten_capability()}"


def get(threads: int, remeasure: bool = False) -> Limits:
    """The cached limits for this machine at ``threads``; measured (and cached) when absent."""
    path, key = cache_path(), _key(threads)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):  # no cache yet, or an unreadable one: start a new one
        doc = {}
    if not remeasure and isinstance(doc.get(key), dict):
        try:
            entry = {k: v for k, v in doc[key].items() if k not in ("cached", "peak_gflops")}
            return Limits(**entry, cached=True)
        except TypeError:  # written by another version of this module: measure again
            pass
    lim = measure(threads)
    doc[key] = {k: v for k, v in asdict(lim).items() if k != "cached"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)  # atomic: a concurrent run reads the old or the new file, never half
    return lim
