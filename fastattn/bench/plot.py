"""``fastattn-bench --plot PATH``: one panel per op, variant and dtype of the run, each
implementation's speed against the sequence length (attention, models) or row size (softmax,
norms), with the machine's limit as a horizontal line: GFLOP/s against the peak for the dtype
(the FMA peak, or ``--peak``) for compute-bound cases, GB/s against the measured copy bandwidth
for the others, the median ms where neither is known. Needs matplotlib (``fastattn[bench]``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from fastattn.bench.report import Row

__all__ = ["MISSING", "Series", "panels", "require", "write_plot", "x_of"]

MISSING = "--plot needs matplotlib, which is not installed (pip install matplotlib)"

# (op, variant, dtype) -> (x label, y label, limit or nan, {impl: [(x, y, rest of the shape)]});
# the rest of the shape (the x dim replaced by "_") keeps e.g. head dims 64 and 128 on two lines.
Point = tuple[int, float, str]
Series = dict[tuple[str, str, str], tuple[str, str, float, dict[str, list[Point]]]]


def require() -> None:
    """RuntimeError with :data:`MISSING` when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(MISSING) from e


def x_of(r: Row) -> tuple[int, str, str]:
    """The x value of a row, its axis label and the rest of the shape: the key sequence length
    of attention (``BxHxSxD``, ``BxHxHkvxSqxSkxD``) and of the model cases (``1xS``), else the
    row size."""
    dims = r.shape.split("x")
    i = len(dims) - 2 if r.op == "attention" else len(dims) - 1
    rest = "x".join("_" if j == i else d for j, d in enumerate(dims))
    label = "sequence length" if r.op == "attention" or r.tokens else "row size"
    return int(dims[i]), label, rest


def _metric(r: Row, copy_gbps: float, peak: Mapping[str, float]) -> tuple[str, float, float]:
    if r.flops:
        return "GFLOP/s", r.gflops, peak.get(r.dtype, math.nan)
    if r.nbytes:
        return "GB/s", r.gbps, copy_gbps
    return "median ms", r.median_ms, math.nan


def panels(rows: list[Row], copy_gbps: float, peak: Mapping[str, float]) -> Series:
    """The panels of :func:`write_plot`: rows that ran, grouped, each series sorted by x."""
    out: Series = {}
    for r in rows:
        if r.error is not None or not math.isfinite(r.median_ms):
            continue
        ylabel, y, limit = _metric(r, copy_gbps, peak)
        x, xlabel, rest = x_of(r)
        key = (r.op, r.variant, r.dtype)
        panel = out.setdefault(key, (xlabel, ylabel, limit, {}))
        panel[3].setdefault(r.impl, []).append((x, y, rest))
    for _, _, _, series in out.values():
        for pts in series.values():
            pts.sort()
    return out


def write_plot(path: str, rows: list[Row], copy_gbps: float, peak: Mapping[str, float]) -> int:
    """Draw the panels of ``rows`` into the image ``path`` (its format from the suffix, e.g.
    ``.png``); returns the number of panels."""
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = panels(rows, copy_gbps, peak)
    n = max(len(data), 1)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(5.5 * cols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, ((op, variant, dtype), (xlabel, ylabel, limit, series)) in zip(
        axes, data.items(), strict=False
    ):
        for n_impl, (impl, pts) in enumerate(series.items()):
            color = f"C{n_impl % 10}"
            for n_line, rest in enumerate(dict.fromkeys(p[2] for p in pts)):  # one line a shape
                line = [p for p in pts if p[2] == rest]
                ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", color=color,
                        label=impl if n_line == 0 else None)  # fmt: skip
        if math.isfinite(limit):
            what = "copy bandwidth" if ylabel == "GB/s" else "peak"
            ax.axhline(limit, color="black", linestyle="--", linewidth=1,
                       label=f"machine {what} {limit:.0f} {ylabel}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {variant} {dtype}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(data) :]:
        ax.set_visible(False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return len(data)
