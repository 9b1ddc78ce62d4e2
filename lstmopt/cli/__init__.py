"""The ``lstmopt`` command line: optimize, inspect, verify, bench, demo, batch and merge-reports.

torch is imported inside the commands, so ``lstmopt --help`` answers at once. Every error a user can act
on is one line on stderr and a documented exit code (see ``lstmopt.errors`` and the README); a
traceback appears only with ``--debug``.

- ``app``: the Typer app, its error policy and the entry point ``main``;
- ``options``: the options several commands share, and reading what they name;
- ``ui``: where output goes (tables on stdout, progress and warnings on stderr, JSON alone);
- one module per command (``batch_command`` for batch runs).
"""

from lstmopt.cli.app import app, main
from lstmopt.cli import optimize, inspection, verify, bench, demo, batch_command  # noqa: F401  (each registers its command)

__all__ = ["app", "main"]
