"""Timers for the benchmark CLI: wall clock on CPU, CUDA events on GPU; allocator and cache set-up.

Every repetition is timed on its own so that the median and the inter-quartile range can be
reported (a mean hides the page-fault and scheduler outliers that dominate CPU runs), and the
implementations of a case are timed in turns, so that they share the same conditions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

T = TypeVar("T")

ALLOC_MODES = ("fresh", "reuse")
_alloc_mode = "fresh"


@dataclass
class Budget:
    """How long to warm up and measure one implementation."""

    warmup_s: float = 0.05
    min_warmup: int = 2
    min_time_s: float = 0.5
    min_reps: int = 10
    max_reps: int = 10_000

    @classmethod
    def quick(cls) -> Budget:
        return cls(warmup_s=0.01, min_warmup=1, min_time_s=0.05, min_reps=3, max_reps=200)


@dataclass
class Stats:
    """Per-call times of one implementation, in milliseconds."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    mean_ms: float
    reps: int

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


def summarize(times_ms: list[float]) -> Stats:
    """Median, quartiles (inclusive method), minimum and mean of per-call times."""
    if not times_ms:
        raise ValueError("no timings to summarise")
    if len(times_ms) == 1:
        q25 = q75 = times_ms[0]
    else:
        q25, _, q75 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return Stats(
        median_ms=statistics.median(times_ms),
        q25_ms=q25,
        q75_ms=q75,
        min_ms=min(times_ms),
        mean_ms=statistics.fmean(times_ms),
        reps=len(times_ms),
    )


def _flush_buffer(device: torch.device) -> torch.Tensor:
    # Larger than the last-level cache of current CPUs (L3 per CCD) and GPUs (L2 up to ~100 MiB).
    mib = 256 if device.type == "cuda" else 128
    return torch.empty(mib * 2**20 // 4, dtype=torch.int32, device=device)


def time_fn(
    fn: Callable[[], Any], device: torch.device, budget: Budget, *, flush: bool = False
) -> Stats:
    """:func:`time_fns` of one function."""
    return time_fns([fn], device, budget, flush=flush)[0]


def time_fns(
    fns: Sequence[Callable[[], Any]],
    device: torch.device,
    budget: Budget,
    *,
    flush: bool = False,
) -> list[Stats]:
    """Warm each of ``fns`` up, then time them in turns: one call of each per round.

    Rounds go on until every function has ``budget.min_reps`` calls and ``budget.min_time_s``
    per function has passed. Interleaving gives the implementations of a case the same
    conditions (frequency, other processes on the machine), so their ratio is fair even when
    the absolute times drift. CPU: ``time.perf_counter`` around each call. CUDA: a pair of
    CUDA events around each call, read after synchronising. ``flush`` overwrites a buffer
    larger than the last-level cache before every call (untimed), so inputs come from memory.
    """
    cuda = device.type == "cuda"
    buf = _flush_buffer(device) if flush else None
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)

    for fn in fns:
        start, n = time.perf_counter(), 0
        while n < budget.min_warmup or time.perf_counter() - start < budget.warmup_s:
            fn()
            n += 1
        sync()

    times: list[list[float]] = [[] for _ in fns]
    events: list[list[tuple[Any, Any]]] = [[] for _ in fns]
    t_begin = time.perf_counter()
    for rnd in range(1, budget.max_reps + 1):
        for k, fn in enumerate(fns):
            if buf is not None:
                buf.zero_()
            if cuda:
                ev0 = torch.cuda.Event(enable_timing=True)
                ev1 = torch.cuda.Event(enable_timing=True)
                ev0.record()
                fn()
                ev1.record()
                events[k].append((ev0, ev1))
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        if cuda and rnd % 32 == 0:
            sync()  # bounds the queue, and lets the time budget below see real time
        elapsed = time.perf_counter() - t_begin
        if rnd >= budget.min_reps and elapsed >= budget.min_time_s * len(fns):
            break
    if cuda:
        sync()
        times = [[float(a.elapsed_time(b)) for a, b in evs] for evs in events]
    return [summarize(t) for t in times]


def call_once(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall time in ms (e.g. the first call, which includes ``torch.compile``)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, (time.perf_counter() - t0) * 1e3


def gbps(nbytes: int, ms: float) -> float:
    """Bytes moved per second, in GB/s (10^9), for a call of ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 and math.isfinite(ms) else float("nan")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") else None


def set_alloc_mode(mode: str) -> str:
    """Select how CPU tensors get their memory; returns a line describing what was done.

    ``fresh`` leaves glibc alone: blocks of 32 MiB and more are mmap'ed on every allocation
    and unmapped on free, so each call of an op that allocates its output pays the page faults
    of touching fresh pages (every peer alike). ``reuse`` raises glibc's mmap and trim
    thresholds with ``mallopt`` so that freed blocks stay in the heap and are handed out again,
    as a caching allocator would. It applies to the whole process and cannot be undone.
    """
    global _alloc_mode
    if mode not in ALLOC_MODES:
        raise ValueError(f"alloc mode must be one of {ALLOC_MODES}, got {mode!r}")
    if mode == "fresh":
        if _alloc_mode == "reuse":
            return "fresh requested, but this process already switched to reuse (irreversible)"
        return "fresh (glibc defaults: outputs >= 32 MiB are mmap'ed and page-faulted every call)"
    lib = _libc()
    if lib is None:
        raise RuntimeError("--alloc reuse needs glibc's mallopt, which is not available here")
    ok_trim = lib.mallopt(M_TRIM_THRESHOLD, _INT_MAX)
    ok_mmap = lib.mallopt(M_MMAP_THRESHOLD, _INT_MAX)
    how = "M_MMAP_THRESHOLD=M_TRIM_THRESHOLD=2^31-1"
    if not ok_mmap:  # older glibc caps the threshold at HEAP_MAX/2: disable mmap instead
        ok_mmap = lib.mallopt(M_MMAP_MAX, 0)
        how = "M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1"
    if not (ok_trim and ok_mmap):
        raise RuntimeError("--alloc reuse: glibc mallopt refused the new thresholds")
    _alloc_mode = "reuse"
    return f"reuse (mallopt {how}: freed blocks are reused, no page faults after warm-up)"


def alloc_mode() -> str:
    """The allocation mode in effect in this process."""
    return _alloc_mode


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak of the bytes allocated during ``fn()`` above those allocated before it, its result
    included (freed at the end); one untimed call. NaN where the probe is unavailable.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: torch has no
    allocator statistics there, so the profiler records every allocation and free of torch's
    CPU allocator (``profile_memory=True``) and the running sum is taken in time order. That
    covers every tensor allocated by torch's ops, fastattn's C++ ops and the code that
    torch.compile generates (all use that allocator), on every thread; it misses memory a
    kernel takes from ``malloc`` directly (none of fastattn's kernels do: their scratch is
    tensors) and it is exact, not page-granular like RSS.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:  # the raw allocator events (the aggregated event tree folds them into their ops)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # pragma: no cover - a torch without these internals
        return math.nan
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if str(e.device_type()).endswith("CPU"):  # DeviceType.CPU
            cur += e.nbytes()
            peak = max(peak, cur)
    return float(peak)
