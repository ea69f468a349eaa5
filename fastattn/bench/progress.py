"""The progress line of long ``fastattn-bench`` runs: cases done / total, the current case, the
time elapsed and an estimate of the time left, on one line of a terminal rewritten with ``\\r``."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``start(case_id)`` before each case, ``clear()`` before printing anything else on the
    terminal, ``close()`` at the end. Writes nothing unless ``enabled``; the estimate of the time
    left is the mean time per finished case times the cases left."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.stream, self.enabled, self.clock = total, stream, enabled, clock
        self.done = 0
        self.t0 = clock()
        self.shown = False

    def line(self, case_id: str) -> str:
        elapsed = self.clock() - self.t0
        left = (
            f"~{format_duration(elapsed / self.done * (self.total - self.done))} left"
            if self.done
            else "? left"
        )
        text = f"[{self.done}/{self.total}] {case_id}  {format_duration(elapsed)} elapsed, {left}"
        width = shutil.get_terminal_size((100, 24)).columns - 1
        return text if len(text) <= width else text[: max(width - 3, 0)] + "..."

    def start(self, case_id: str) -> None:
        """Show that ``case_id`` is running (the cases before it are done)."""
        if self.enabled:
            self.stream.write("\r\x1b[K" + self.line(case_id))
            self.stream.flush()
            self.shown = True

    def finish_case(self) -> None:
        self.done += 1

    def clear(self) -> None:
        """Erase the line, so that what is printed next starts on a clean line."""
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def close(self) -> None:
        self.clear()
