"""``fastattn-bench`` outputs besides the tables: ``--plot``, ``--markdown PATH`` sections and the
progress line on a terminal."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import quick_limits

from fastattn import bench
from fastattn.bench import mdsection, plot, progress
from fastattn.bench.report import Row

FAST = ["--quick", "--dtype", "fp32", "--min-time", "0.002", "--threads", "1"]
ONE = ["softmax", *FAST, "--shape", "16x512", "--no-compile", "--no-runtimes"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def _limits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _own_limits_cache(_limits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(_limits_cache))
    quick_limits(monkeypatch)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# ------------------------------------------------------------------------- markdown sections
def test_section_is_created_replaced_and_the_rest_kept() -> None:
    begin, end = mdsection.markers("softmax")
    assert mdsection.replace_section("", "softmax", "table 1\n") == f"{begin}\ntable 1\n{end}\n"
    doc = "# Results\n\nintro\n"
    once = mdsection.replace_section(doc, "softmax", "table 1")
    assert once == f"{doc}\n{begin}\ntable 1\n{end}\n"
    other = mdsection.replace_section(once + "\nafter text\n", "norms", "norm table")
    twice = mdsection.replace_section(other, "softmax", "table 2\nmore")
    assert twice == other.replace("table 1", "table 2\nmore")
    assert "intro" in twice and "after text" in twice and "norm table" in twice
    assert mdsection.replace_section(twice, "softmax", "table 2\nmore") == twice  # idempotent
    with pytest.raises(ValueError, match="without"):
        mdsection.replace_section(f"{begin}\nno end\n", "softmax", "x")
    with pytest.raises(ValueError, match="without"):
        mdsection.replace_section(f"stray {end}\n", "softmax", "x")
    with pytest.raises(ValueError, match="bad section name"):
        mdsection.replace_section("", "a b -->", "x")


def test_markdown_path_writes_a_section_with_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    md, img, js = (
        tmp_path / "docs" / "results.md",
        tmp_path / "img" / "softmax.png",
        tmp_path / "r.json",
    )
    md.parent.mkdir()
    old = "\n".join(mdsection.markers("softmax")).replace("-->\n", "-->\nold table\n")
    md.write_text(f"# Results\n\nkept before\n\n{old}\n\nkept after\n")
    err = FakeTTY()  # a terminal, but --json with stdout redirected: no progress line
    monkeypatch.setattr(sys, "stderr", err)
    argv = [*ONE, "-k=-softmax-,-log_softmax-", "--plot", str(img), "--markdown", str(md)]
    assert bench.main([*argv, "--json", str(js)]) == 0
    assert img.read_bytes()[:8] == PNG and img.stat().st_size > 5000
    text = md.read_text()
    assert text.startswith("# Results\n\nkept before\n\n<!-- fastattn-bench:softmax -->\n")
    assert text.endswith("<!-- /fastattn-bench:softmax -->\n\nkept after\n")
    assert "old table" not in text and text.count("fastattn-bench:softmax") == 2
    assert "![fastattn-bench softmax](../img/softmax.png)" in text
    assert "| softmax | 16x512 | fp32 | log_softmax | **fastattn[cpu]** |" in text
    out = capsys.readouterr().out
    assert "wrote section softmax of" in out and "| op | shape |" not in out  # not on stdout
    assert err.getvalue() == ""
    assert json.loads(js.read_text())["config"]["plot"] == str(img)
    # again, under another section name and without a plot: the first section stays
    assert bench.main([*ONE, "-k=-softmax-", "--markdown", str(md), "--section", "b.2"]) == 0
    again = md.read_text()
    assert again.startswith(text) and "<!-- /fastattn-bench:b.2 -->" in again
    assert again.count("](") == 1


def test_bare_markdown_prints_and_may_precede_the_ops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    assert bench.main(["--markdown", *ONE, "-k=-softmax-,-log_softmax-"]) == 0
    out = capsys.readouterr().out
    assert "| op | shape |" in out and "| log_softmax |" in out and list(tmp_path.iterdir()) == []
    # a terminal: the progress line, rewritten per case, erased before each table row
    shown = err.getvalue()
    assert "\r\x1b[K[0/2] softmax-softmax-16x512-fp32  0:0" in shown and "? left" in shown
    assert "[1/2] softmax-log_softmax-16x512-fp32" in shown and " left" in shown
    assert shown.endswith("\r\x1b[K") and "\n" not in shown


def test_no_progress_line_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()
    assert bench.main([*ONE, "-k=-softmax-"]) == 0
    assert "\r" not in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_one_line_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main([*ONE, "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"fastattn-bench: error: {plot.MISSING}\n"
    assert not (tmp_path / "p.png").exists()
    assert bench.main([*ONE, "--markdown", str(tmp_path / "r.md"), "--section", "a b"]) == 2


# -------------------------------------------------------------------------- plot and progress
def _row(op: str, shape: str, impl: str, **kw: object) -> Row:
    r = Row(op, shape, "fp32", "fwd", impl, impl == "fa", 1000, median_ms=1.0)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_plot_panels_pick_the_axis_metric_and_limit() -> None:
    rows = [
        _row("softmax", "64x4096", "fa", gbps=30.0),
        _row("softmax", "64x1024", "fa", gbps=20.0),
        _row("softmax", "64x1024", "torch", gbps=10.0),
        _row("softmax", "64x2048", "broken", error="boom"),
        _row("attention", "1x8x2048x64", "fa", flops=10, gflops=50.0),
        _row("transformer", "1x128", "fa", tokens=128, flops=0, nbytes=0),
    ]
    p = plot.panels(rows, copy_gbps=40.0, peak={"fp32": 200.0})
    assert p[("softmax", "fwd", "fp32")] == (
        "row size",
        "GB/s",
        40.0,
        {"fa": [(1024, 20.0, "64x_"), (4096, 30.0, "64x_")], "torch": [(1024, 10.0, "64x_")]},
    )
    assert p[("attention", "fwd", "fp32")] == (
        "sequence length",
        "GFLOP/s",
        200.0,
        {"fa": [(2048, 50.0, "1x8x_x64")]},
    )
    xlabel, ylabel, limit, series = p[("transformer", "fwd", "fp32")]
    assert (xlabel, ylabel, series) == ("sequence length", "median ms", {"fa": [(128, 1.0, "1x_")]})
    assert math.isnan(limit)


def test_progress_line_counts_and_estimates() -> None:
    now = [100.0]
    out = FakeTTY()
    bar = progress.Progress(4, out, enabled=True, clock=lambda: now[0])
    assert bar.line("a") == "[0/4] a  0:00 elapsed, ? left"
    for _ in range(2):
        bar.start("case")
        now[0] += 10
        bar.finish_case()
    assert bar.line("c") == "[2/4] c  0:20 elapsed, ~0:20 left"
    now[0] += 3600
    assert bar.line("c").endswith("1:00:20 elapsed, ~1:00:20 left")
    bar.close()
    assert out.getvalue().count("\r\x1b[K") == 3 and out.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    off = progress.Progress(4, quiet, enabled=False)
    off.start("x")
    off.close()
    assert quiet.getvalue() == ""
