"""Result rows, the plain-text and Markdown tables, and the machine description for JSON."""

from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fastattn.bench import limits


@dataclass
class Row:
    """One implementation of one case: its timing, bandwidth, speed-up and agreement check."""

    op: str
    shape: str
    dtype: str
    variant: str
    impl: str
    subject: bool  # fastattn's own row
    nbytes: int
    median_ms: float = math.nan
    q25_ms: float = math.nan
    q75_ms: float = math.nan
    min_ms: float = math.nan
    reps: int = 0
    first_call_ms: float = math.nan  # includes torch.compile for compiled peers
    gbps: float = math.nan
    bw_pct: float = math.nan  # gbps as a percentage of the machine's measured copy bandwidth
    flops: int = 0  # of the case; 0: not reported (bandwidth-bound ops)
    gflops: float = math.nan
    peak_pct: float = math.nan  # gflops as a percentage of the machine's peak for the dtype
    mem_bytes: float = math.nan  # peak extra memory of one call (timing.peak_extra_bytes)
    tokens: int = 0  # tokens one call processes (model cases): tokens/s reported
    speedup: float | None = None  # peer rows: peer median / fastattn median (>1: fastattn faster)
    check_ok: bool = False
    tolerated: bool = False  # a peer known to be inexact: its failed check does not fail the run
    check: str = ""
    max_err: float = math.nan
    error: str | None = None  # the exception, when the implementation failed to run

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iqr_ms"] = self.iqr_ms
        # JSON has no NaN/inf: write null.
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }


COLUMNS = (
    ("op", 13, "<"),
    ("shape", 17, "<"),
    ("dtype", 5, "<"),
    ("variant", 19, "<"),
    ("impl", 26, "<"),
    ("median ms", 10, ">"),
    ("IQR ms", 8, ">"),
    ("min ms", 8, ">"),
    ("GB/s", 7, ">"),
    ("% BW", 5, ">"),
    ("fastattn speedup", 16, ">"),
    ("check", 8, "<"),
)
# Inserted after % BW when the rows are of a compute-bound op (attention).
COMPUTE_COLUMNS = (
    ("GFLOP/s", 8, ">"),
    ("% peak", 6, ">"),
    ("peak MiB", 9, ">"),
    ("tok/s", 8, ">"),
)
_AFTER = [name for name, _, _ in COLUMNS].index("% BW") + 1


def columns(compute: bool) -> tuple[tuple[str, int, str], ...]:
    return COLUMNS[:_AFTER] + COMPUTE_COLUMNS + COLUMNS[_AFTER:] if compute else COLUMNS


def is_compute(rows: list[Row]) -> bool:
    return any(r.flops or r.tokens for r in rows)


def _num(v: float, digits: int = 3) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}" if v < 100 else f"{v:.1f}"


def _cells(r: Row, compute: bool = False) -> list[str]:
    speed = "" if r.speedup is None or not math.isfinite(r.speedup) else f"{r.speedup:.2f}x"
    status = "ERROR" if r.error else ("ok" if r.check_ok else "MISMATCH")
    status = "inexact" if r.tolerated else status
    tok_s = r.tokens / (r.median_ms * 1e-3) if r.tokens else math.nan
    extra = [_num(r.gflops, 1), _num(r.peak_pct, 1), _num(r.mem_bytes / 2**20, 1), _num(tok_s, 1)]
    cells = [
        r.op,
        r.shape,
        r.dtype,
        r.variant,
        r.impl,
        _num(r.median_ms),
        _num(r.iqr_ms),
        _num(r.min_ms),
        _num(r.gbps, 1),
        _num(r.bw_pct, 1),
        speed,
        status,
    ]
    return cells[:_AFTER] + extra + cells[_AFTER:] if compute else cells


def table_header(compute: bool = False) -> str:
    line = "  ".join(f"{name:{align}{width}}" for name, width, align in columns(compute))
    return line + "\n" + "-" * len(line)


def table_rows(rows: list[Row], compute: bool = False) -> str:
    cols = columns(compute)
    return "\n".join(
        "  ".join(
            f"{c:{align}{width}}"
            for c, (_, width, align) in zip(_cells(r, compute), cols, strict=True)
        )
        for r in rows
    )


def markdown(rows: list[Row], info: dict[str, Any] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (numbers right-aligned), after a line naming the
    machine and its limits when ``info`` (:func:`machine_info`) is given."""
    compute = is_compute(rows)
    cols = columns(compute)
    head = "| " + " | ".join(name for name, _, _ in cols) + " |"
    rule = "| " + " | ".join("---:" if align == ">" else "---" for _, _, align in cols) + " |"
    body = []
    for r in rows:
        cells = _cells(r, compute)
        cells[4] = f"**{cells[4]}**" if r.subject else cells[4]  # the impl column
        body.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lead = [f"*{machine_line(info)}; {limits_line(info)}*", ""] if info else []
    return "\n".join([*lead, head, rule, *body])


def machine_info(
    argv: list[str], device: torch.device, threads: int, lim: limits.Limits | None = None
) -> dict[str, Any]:
    """Facts that make a result file interpretable later; ``lim``: the measured limits."""
    import fastattn
    from fastattn.bench import peers

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fastattn-bench", *argv]),
        "cpu": limits.cpu_model(),
        "cpu_isa": limits.cpu_isa(),  # fastattn's CPU vector path
        "aten_cpu_capability": limits.aten_capability(),
        "cores": cores,
        "threads": threads,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastattn": fastattn.__version__,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "backends": fastattn.backends(),
        "limits": None if lim is None else lim.as_dict(),
        "peer_runtimes": peers.runtime_versions(),
        "peer_notes": peers.notes(),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"cpu: {info['cpu']}; fastattn CPU ISA: {info['cpu_isa']}; ATen CPU capability: "
        f"{info['aten_cpu_capability']}; threads: {info['threads']}"
    )


def limits_line(info: dict[str, Any]) -> str:
    lim = info.get("limits")
    if lim is None:
        return f"limits: not measured for {info['device']} (--peak sets % peak)"
    return limits.Limits(**{k: v for k, v in lim.items() if k != "peak_gflops"}).describe()


def header_lines(
    info: dict[str, Any], alloc: str, flush: bool, timer: str, compute: bool = False
) -> list[str]:
    rep = info["backends"]
    avail = ", ".join(
        f"{name}=" + ("yes" if st["available"] else "no") for name, st in rep["backends"].items()
    )
    ext = rep.get("extension", {})
    ext_s = ", ".join(f"{k} {ext[k]}" for k in ("cpu_isa", "cuda_archs") if k in ext) or str(ext)
    dev = info["gpu"] or f"{info['cpu']} ({info['cores']} cores)"
    load = info.get("loadavg_1m")
    busy = []
    if info["device"] == "cpu" and load is not None and load >= 1.0:
        busy = [
            f"WARNING: load average {load:.1f} before the run: other processes share these cores"
        ]
    return [
        *busy,
        f"fastattn-bench: fastattn {info['fastattn']}, torch {info['torch']}, "
        f"triton {info['triton']}, python {info['python']}",
        f"device: {info['device']} - {dev}; torch threads: {info['threads']}",
        machine_line(info),
        limits_line(info),
        f"backends: {avail}; extension: {ext_s}",
        f"alloc: {alloc}",
        f"timer: {timer}; caches: {'flushed before each call' if flush else 'warm'}",
        "GB/s: bytes of the fused op (inputs read once at their own size, output written once), "
        "the same for every impl of a case; speedup = peer median / fastattn median; "
        "compile(f): torch.compile(f, dynamic=False), compiled by its first (untimed) call; "
        "% BW: GB/s as a percentage of the measured (DRAM) copy bandwidth; cases that fit in the "
        "caches can exceed 100",
        *COMPUTE_NOTE * compute,
        "peers: "
        + ", ".join(f"{k} {v or 'absent'}" for k, v in info["peer_runtimes"].items())
        + " (forward only; ORT: onnxruntime, OV: OpenVINO; compiled by the first call)",
        *(f"peer note: {n}" for n in info["peer_notes"]),
    ]


COMPUTE_NOTE = [
    "GFLOP/s: the op's FLOPs (attention: 4*B*H*Sq*Sk*D forward, half of it causal, x3.5 with "
    "the backward) per median second, the same for every impl; % peak: of the measured matmul "
    "GFLOP/s for the dtype (--peak overrides it); peak MiB: most memory allocated at once "
    "during one call, above what was allocated before it (results included; torch's "
    "allocator, see timing.py); tok/s: tokens one call processes (model cases) per median "
    "second; ORT/OV peers allocate outside torch: their peak MiB counts only the outputs "
    "torch allocates for them"
]
