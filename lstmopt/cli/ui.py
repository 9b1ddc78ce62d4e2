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



class UI:
    """Where output goes: tables on stdout, progress and warnings on stderr, JSON alone on stdout."""

    def __init__(self, *, quiet: bool = False, json_mode: bool = False) -> None:
        self.quiet, self.json_mode = quiet, json_mode
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

            sys.stdout.write(report_json(data))
            sys.stdout.flush()

    def status(self, message: str):
        """A spinner on stderr (a no-op when quiet or emitting JSON)."""
        import contextlib

        return self.err.status(message) if self.chatty else contextlib.nullcontext()
