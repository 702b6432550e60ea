"""How library functions report progress without printing.

Library entry points (``train``, ``encode``, ``decode``, ``bench``) take ``reporter: Reporter | None``. The CLI passes
a rich-backed reporter; library users pass nothing (silent) or their own subclass.
"""

from __future__ import annotations


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


def resolve(reporter: Reporter | None) -> Reporter:
    """The given reporter, or a silent one."""
    return reporter if reporter is not None else Reporter()
