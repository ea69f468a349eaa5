"""Running one benchmark case: every implementation checked against the float64 oracle, then
the ones that ran timed in turns (:mod:`fastattn.bench.timing`), giving one report row each."""

from __future__ import annotations

import functools
import math

import torch

from fastattn.bench import report, timing
from fastattn.bench.framework import Case, compare

__all__ = ["run_case"]


def run_case(
    case: Case,
    device: torch.device,
    budget: timing.Budget,
    flush: bool,
    copy_gbps: float = math.nan,
) -> list[report.Row]:
    """Check every implementation of ``case`` against the oracle, then time each that ran;
    ``copy_gbps``: the machine's copy bandwidth, for the % BW column."""
    inputs = case.make_inputs(device)
    ref = case.reference(inputs)
    rows: list[report.Row] = []
    for impl in case.impls:
        row = report.Row(
            case.op,
            case.shape_str,
            case.dtype_str,
            case.variant,
            impl.name,
            impl.subject,
            case.nbytes,
            flops=case.flops,
            tokens=case.tokens,
        )
        rows.append(row)
        try:
            out, row.first_call_ms = timing.call_once(functools.partial(impl.fn, inputs), device)
            chk = (case.check or compare)(out, ref, case.dtype)
            del out
        except Exception as e:  # report any failure of an implementation as a row
            row.error = f"{type(e).__name__}: {e}"
            row.check = f"ERROR: {row.error}"
            continue
        row.check_ok, row.check, row.max_err = chk.ok, chk.message, chk.max_err
        if not chk.ok and impl.inexact and not impl.subject:
            row.tolerated, row.check = True, f"{chk.message} (known: {impl.inexact})"
    del ref
    ok = [(impl, row) for impl, row in zip(case.impls, rows, strict=True) if row.error is None]
    try:
        fns = [functools.partial(impl.fn, inputs) for impl, _ in ok]
        stats = timing.time_fns(fns, device, budget, flush=flush)
    except Exception as e:  # e.g. out of memory while timing: the case has no timings
        for _, row in ok:
            row.error = f"{type(e).__name__} while timing: {e}"
            row.check_ok, row.check = False, f"ERROR: {row.error}"
        return rows
    for (_, row), st in zip(ok, stats, strict=True):
        row.median_ms, row.q25_ms, row.q75_ms = st.median_ms, st.q25_ms, st.q75_ms
        row.min_ms, row.reps = st.min_ms, st.reps
        row.gbps = timing.gbps(case.nbytes, st.median_ms) if case.nbytes else math.nan
        row.bw_pct = 100 * row.gbps / copy_gbps
        if case.flops:
            row.gflops = case.flops / (st.median_ms * 1e-3) / 1e9
            row.peak_pct = 100 * row.gflops / case.peak_gflops
    for impl, row in ok if case.memory else ():
        try:
            row.mem_bytes = timing.peak_extra_bytes(functools.partial(impl.fn, inputs), device)
        except Exception as e:  # the probe is extra information: note it, keep the timings
            row.check += f"; memory probe failed: {type(e).__name__}: {e}"
    subject = next((r for r in rows if r.subject and r.error is None), None)
    for r in rows:
        if subject is not None and not r.subject and r.error is None:
            r.speedup = r.median_ms / subject.median_ms
    return rows
