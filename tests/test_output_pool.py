"""The CPU ops' cache of freed output blocks (csrc/output_pool.cpp): reused blocks give the same
results, small outputs bypass it, its limit holds, and tensors from it behave as torch's own
(resize, free on another thread, fork, the profiler's memory events)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.timing import peak_extra_bytes

pytestmark = pytest.mark.skipif(
    not fastattn.backends()["backends"]["cpu"]["available"], reason="needs the CPU extension"
)

# 1024x512 fp32: a 2 MiB output, above the 1 MiB below which torch's allocator serves outputs.
ROWS, COLS = 1024, 512


def _ln(x: torch.Tensor) -> torch.Tensor:
    return fastattn.layer_norm(x, COLS, backend="cpu")


def test_reused_blocks_give_the_same_results():
    x = torch.randn(ROWS, COLS)
    ref = F.layer_norm(x.double(), (COLS,)).float()
    y = _ln(x)
    torch.testing.assert_close(y, ref)
    del y
    before = fastattn.cpu_cache_info()
    assert before["cached_blocks"] >= 1
    for _ in range(3):  # each call takes the block the previous one freed
        x = torch.randn(ROWS, COLS)
        torch.testing.assert_close(_ln(x), F.layer_norm(x.double(), (COLS,)).float())
    after = fastattn.cpu_cache_info()
    assert after["hits"] >= before["hits"] + 3
    assert after["misses"] == before["misses"]


def test_small_outputs_bypass_the_cache():
    before = fastattn.cpu_cache_info()
    y = fastattn.layer_norm(torch.randn(7, 113), 113, backend="cpu")
    assert fastattn.cpu_cache_info()["live_bytes"] == before["live_bytes"]
    assert torch.isfinite(y).all()


def test_outputs_resize_keep_their_data():
    y = _ln(torch.randn(ROWS, COLS))
    want = y.clone()
    y.resize_(2 * ROWS, COLS)  # storage re-allocated through the pool, old bytes copied
    torch.testing.assert_close(y[:ROWS], want, rtol=0, atol=0)


def test_freed_on_another_thread_returns_to_the_cache():
    fastattn.empty_cpu_cache()
    box = [_ln(torch.randn(ROWS, COLS))]
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    assert fastattn.cpu_cache_info()["cached_bytes"] >= ROWS * COLS * 4


def test_many_threads_at_once_keep_the_cache_consistent():
    # A race test of the cache's bookkeeping (and, under `make sanitize`'s ThreadSanitizer build,
    # of every access to it): 8 threads allocate and free outputs of three sizes (blocks reused
    # across threads and sizes, misses) while a ninth empties the cache. Every result must equal
    # the serial one, and the counters must add up exactly afterwards.
    xs = [torch.randn(rows, COLS) for rows in (1024, 1536, 3072)]  # 2, 3, 6 MiB outputs
    want = [_ln(x) for x in xs]
    calls, errors, stop = 40, [], threading.Event()
    before = fastattn.cpu_cache_info()

    def work(i: int) -> None:
        try:
            for c in range(calls):
                x = xs[(i + c) % 3]
                y = _ln(x)
                assert torch.equal(y, want[(i + c) % 3]), f"thread {i}, call {c}"
                if c % 4 == 0:
                    fastattn.cpu_cache_info()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def emptier() -> None:
        while not stop.is_set():
            fastattn.empty_cpu_cache()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    cleaner = threading.Thread(target=emptier)
    cleaner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    cleaner.join(timeout=60)
    assert not any(t.is_alive() for t in threads + [cleaner]), "a thread hung"
    assert not errors, errors
    after = fastattn.cpu_cache_info()
    served = (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])
    assert served == 8 * calls, f"{served} outputs counted for {8 * calls} calls"
    assert after["live_bytes"] == before["live_bytes"], "blocks still counted live after del"
    assert after["cached_bytes"] <= after["limit_bytes"]


def test_empty_cpu_cache_releases_every_cached_block():
    y = _ln(torch.randn(ROWS, COLS))
    del y
    assert fastattn.cpu_cache_info()["cached_bytes"] > 0
    assert fastattn.empty_cpu_cache() >= ROWS * COLS * 4
    info = fastattn.cpu_cache_info()
    assert info["cached_bytes"] == 0 and info["cached_blocks"] == 0


def test_profiler_sees_outputs_from_the_cache():
    x = torch.randn(ROWS, COLS)
    _ln(x)  # freed at once: the measured call below is served from the cache
    assert peak_extra_bytes(lambda: _ln(x), torch.device("cpu")) >= ROWS * COLS * 4


def _run(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("limit", "want_cached"),
    [
        ("0", 0),  # off: every output from torch's allocator, nothing kept
        (str(3 << 20), 2 << 20),  # room for one of the two freed 2 MiB blocks, not both
    ],
)
def test_limit_from_the_environment(limit, want_cached):
    out = _run(
        """
        import torch, fastattn, torch.nn.functional as F
        xs = [torch.randn(1024, 512) for _ in range(2)]
        ys = [fastattn.layer_norm(x, 512, backend="cpu") for x in xs]
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, F.layer_norm(x.double(), (512,)).float())
        del ys
        info = fastattn.cpu_cache_info()
        print(info["limit_bytes"], info["cached_bytes"])
        """,
        FASTATTN_CPU_CACHE_BYTES=limit,
    )
    assert out.split() == [limit, str(want_cached)]


def test_outputs_above_the_limit_bypass_the_cache():
    # A block larger than the limit could never be kept: it comes from torch's allocator (a fresh
    # mapping of the cache's was 2.3x slower at 4 GiB), so the cache neither counts nor holds it.
    out = _run(
        """
        import torch, fastattn, torch.nn.functional as F
        x = torch.randn(2048, 1024)  # an 8 MiB output, over the 4 MiB limit
        y = fastattn.layer_norm(x, 1024, backend="cpu")
        torch.testing.assert_close(y, F.layer_norm(x.double(), (1024,)).float())
        info = fastattn.cpu_cache_info()
        print(info["live_bytes"], info["misses"], info["hits"])
        """,
        FASTATTN_CPU_CACHE_BYTES=str(4 << 20),
    )
    assert out.split() == ["0", "0", "0"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_frees_and_allocates():
    _run(
        """
        import os, torch, fastattn
        y = fastattn.layer_norm(torch.randn(1024, 512), 512, backend="cpu")
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)  # libgomp's pool does not survive fork (as in DataLoader)
            del y
            z = fastattn.layer_norm(torch.randn(1024, 512), 512, backend="cpu")
            os._exit(0 if torch.isfinite(z).all() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        """
    )
