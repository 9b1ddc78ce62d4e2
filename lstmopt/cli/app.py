"""The Typer app, lstmopt's error policy for every command, and the entry point."""

from __future__ import annotations

import signal
import sys
import traceback
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from lstmopt import __version__
from lstmopt.environment import hide_numpy_warning
from lstmopt.errors import LstmoptError, one_line, without_tensor_values

hide_numpy_warning()

try:  # typer >= 0.29 vendors click
    from typer._click.exceptions import UsageError as _ClickUsageError
except ImportError:  # pragma: no cover - older typer depends on click itself
    from click.exceptions import UsageError as _ClickUsageError

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Failed", "app", "main"]

EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM exits with 143
EXIT_TERMINATED = 143

app = typer.Typer(
    name="lstmopt",
    help="Rewrite saved PyTorch models so their nn.LSTM layers run on weights packed once for oneDNN (CPU).",
    epilog="Example: `lstmopt demo`   |   Docs: README.md. Exit codes: 0 ok, 1 internal error, "
           "2 bad usage or input, 3 untrusted pickle or TorchScript refused (no --trust), 4 nothing to optimize (--require-lstm), "
           "5 verification failed, 6 speedup below --min-speedup, 130 interrupted (143 on SIGTERM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"lstmopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Rewrite saved PyTorch models so their nn.LSTM layers run on weights packed once for oneDNN (CPU)."""



class Failed(Exception):
    """A command's outcome already reported in full; ``main`` prints the one-line error and exits."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code



# --- entry point ------------------------------------------------------------------------------------

class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that temporary files are removed on the way out."""


def _terminate(signum, frame):
    raise _Terminated()


def _error(message: str) -> None:
    Console(stderr=True, highlight=False).print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


class _Group(TyperGroup):
    """lstmopt's error policy for every command, whether run by the console script or by CliRunner:
    one line on stderr and a documented exit code; a traceback only with --debug."""

    def invoke(self, ctx):
        debug = "--debug" in self.arguments
        try:
            return super().invoke(ctx)
        except (typer.Exit, _ClickUsageError):
            raise
        except (LstmoptError, Failed) as exc:
            if debug:
                traceback.print_exc()
            _error(without_tensor_values(str(exc)))
            raise typer.Exit(exc.exit_code) from None
        except _Terminated:
            _error("terminated; no partial output was left")
            raise typer.Exit(EXIT_TERMINATED) from None
        except (KeyboardInterrupt, typer.Abort):
            _error("interrupted; no partial output was left")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # a bug in lstmopt or below it: say so, keep the traceback for --debug
            if debug:
                traceback.print_exc()
            _error(f"internal error: {type(exc).__name__}: {one_line(exc)}"
                   + ("" if debug else " (re-run with --debug for the traceback)"))
            raise typer.Exit(1) from None

    arguments: tuple = ()

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        self.arguments = tuple(sys.argv[1:] if args is None else args)
        previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
        try:
            result = super().main(args=args, prog_name=prog_name or "lstmopt", complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except _ClickUsageError as exc:  # one line instead of click's boxed usage text
            command = exc.ctx.command_path if exc.ctx else "lstmopt"
            message = exc.format_message()
            if message:
                _error(f"{message} (see '{command} --help')")
            code = exc.exit_code if message else 0  # a bare command shows its help
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if standalone_mode:
            sys.exit(code)
        return code


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


app.info.cls = _Group


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return its exit code."""
    try:
        return typer.main.get_command(app).main(args=argv, prog_name="lstmopt", standalone_mode=False)
    finally:
        ui = sys.modules.get("lstmopt.cli.ui")  # not imported by --help, which must stay fast
        if ui is not None:
            ui.restore_stdout()  # --json moved it to stderr for the command's duration
