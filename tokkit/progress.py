"""How library functions report progress without printing.

Library entry points (``train``, ``encode``, ``decode``, ``bench``) take ``reporter: Reporter | None``. The CLI passes
a rich-backed reporter in a terminal and an ``IntervalReporter`` (plain lines every few seconds) when stderr goes to a
file or a pipe; library users pass nothing (silent), an ``IntervalReporter``, or their own subclass.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

INTERVAL_ENV = "TOKKIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


class Reporter:
    """Receives progress and messages from a long-running library call. The base class ignores everything."""

    def start(self, description: str, total: int | None) -> None:
        """A new phase begins; ``total`` units of work (None if unknown)."""

    def advance(self, completed: int, **fields: float | int | str) -> None:
        """``completed`` units of the current phase are done; ``fields`` are live values (loss, img/s ...)."""

    def message(self, text: str) -> None:
        """A one-line note a person should see (e.g. 'LPIPS weights not found: training without perceptual loss')."""

    def stop(self) -> None:
        """The current phase has ended."""


class RecordingReporter(Reporter):
    """Keeps every call, for tests and for callers that want the messages afterwards."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.phases: list[tuple[str, int | None]] = []
        self.last_completed = 0
        self.last_fields: dict[str, float | int | str] = {}

    def start(self, description: str, total: int | None) -> None:
        self.phases.append((description, total))

    def advance(self, completed: int, **fields: float | int | str) -> None:
        self.last_completed = completed
        self.last_fields = dict(fields)

    def message(self, text: str) -> None:
        self.messages.append(text)


class IntervalReporter(Reporter):
    """Plain progress lines for logs: one when a phase starts, one every ``interval`` seconds, one when it ends.

    Each line is whole and flushed at once (``encode: 1200/5000 (24%)  img/s 310  12 s, eta 37 s``), so that a log
    file shows progress while the command runs, not only when it ends.

    Args:
        stream: where the lines go; default ``sys.stderr`` (looked up at each line).
        interval: seconds between two progress lines; default ``$TOKKIT_PROGRESS_INTERVAL`` or 10.
    """

    def __init__(self, stream: TextIO | None = None, interval: float | None = None) -> None:
        self.stream = stream
        self.interval = progress_interval() if interval is None else max(0.0, float(interval))
        self._desc = ""
        self._total: int | None = None
        self._t0 = self._last = 0.0
        self._completed = 0
        self._fields: dict[str, float | int | str] = {}
        self._open = False

    def start(self, description: str, total: int | None) -> None:
        self.stop()
        self._desc, self._total, self._completed, self._fields = description, total, 0, {}
        self._t0 = self._last = time.monotonic()
        self._open = True
        self._write(f"{description}: started" + (f", {total} to do" if total is not None else ""))

    def advance(self, completed: int, **fields: float | int | str) -> None:
        self._completed, self._fields = completed, dict(fields)
        now = time.monotonic()
        if self._open and now - self._last >= self.interval:
            self._last = now
            self._write(self._line(now))

    def message(self, text: str) -> None:
        self._write(text)

    def stop(self) -> None:
        if self._open:
            self._open = False
            self._write(self._line(time.monotonic(), done=True))

    def _line(self, now: float, done: bool = False) -> str:
        elapsed = now - self._t0
        n, total = self._completed, self._total
        count = f"{n}/{total} ({n / total:.0%})" if total else f"{n}"
        parts = [f"{self._desc}: {count}"]
        parts += [f"{k} {_fmt(v)}" for k, v in self._fields.items()]
        timing = f"{elapsed:.0f} s"
        if not done and total and 0 < n < total:
            timing += f", eta {elapsed / n * (total - n):.0f} s"
        parts.append(timing + (", done" if done else ""))
        return "  ".join(parts)

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$TOKKIT_PROGRESS_INTERVAL`` (>= 0) or 10."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def _fmt(v: float | int | str) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def resolve(reporter: Reporter | None) -> Reporter:
    """The given reporter, or a silent one."""
    return reporter if reporter is not None else Reporter()
