"""Where the CLI's output goes: tables on stdout, progress and warnings on stderr, JSON alone on stdout."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from rich.console import Console
from rich.text import Text

__all__ = ["LOG_WIDTH", "UI"]

# A log (CI, a file, a pipe) does not wrap lines, and rich would squeeze tables into 80 columns there.
LOG_WIDTH = 160


def _log_width(stream) -> Optional[int]:
    """The width to print at: the terminal's (or $COLUMNS), else ``LOG_WIDTH`` for a log."""
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return LOG_WIDTH



_REAL_STDOUTS: list = []


def restore_stdout() -> None:
    """Undo what JSON mode did to ``sys.stdout`` (for callers of ``lstmopt.cli.main`` in one process)."""
    if _REAL_STDOUTS:
        sys.stdout = _REAL_STDOUTS[0]
        _REAL_STDOUTS.clear()


class UI:
    """Where output goes: tables on stdout, progress and warnings on stderr, JSON alone on stdout."""

    def __init__(self, *, quiet: bool = False, json_mode: bool = False) -> None:
        self.quiet, self.json_mode = quiet, json_mode
        self._json_out = sys.stdout
        if json_mode:
            # The user's code prints and logs to stdout too (flair's logger does, at import): in JSON mode
            # everything but the report goes to stderr, so stdout stays one parseable document. The stream
            # is kept referenced: a text stream nobody holds closes its buffer when collected.
            _REAL_STDOUTS.append(sys.stdout)
            sys.stdout = sys.stderr
        self.out = Console(highlight=False, width=_log_width(sys.stdout))
        self.err = Console(stderr=True, highlight=False, width=_log_width(sys.stderr))

    @property
    def chatty(self) -> bool:
        return not (self.quiet or self.json_mode)

    def show(self, *renderables: Any) -> None:
        if self.chatty:
            for r in renderables:
                self.out.print(r)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)

    def emit_json(self, data: dict) -> None:
        if self.json_mode:
            from lstmopt.reporting.report import report_json

            self._json_out.write(report_json(data))
            self._json_out.flush()

    def status(self, message: str):
        """A spinner on stderr (a no-op when quiet or emitting JSON)."""
        import contextlib

        return self.err.status(message) if self.chatty else contextlib.nullcontext()
