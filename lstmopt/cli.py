"""The ``lstmopt`` command line: optimize, inspect, verify, bench and demo.

torch is imported inside the commands, so ``lstmopt --help`` answers at once. Every error a user can act
on is one line on stderr and a documented exit code (see ``lstmopt.errors`` and the README); a
traceback appears only with ``--debug``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.text import Text

from . import __version__
from .choices import DTYPES, FORMATS
from .environment import hide_numpy_warning
from .errors import LstmoptError, UsageError

hide_numpy_warning()

try:  # typer >= 0.29 vendors click
    from typer._click.exceptions import UsageError as _ClickUsageError
except ImportError:  # pragma: no cover - older typer depends on click itself
    from click.exceptions import UsageError as _ClickUsageError

__all__ = ["app", "main"]

EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM exits with 143
EXIT_TERMINATED = 143

Format = Enum("Format", {f: f for f in FORMATS}, type=str)  # type: ignore[misc]
Dtype = Enum("Dtype", {d: d for d in DTYPES}, type=str)  # type: ignore[misc]

app = typer.Typer(
    name="lstmopt",
    help="Rewrite saved PyTorch models so their nn.LSTM layers run on weights packed once for oneDNN (CPU).",
    epilog="Example: `lstmopt demo`   |   Docs: README.md. Exit codes: 0 ok, 1 internal error, "
           "2 bad usage or input, 3 untrusted pickle refused, 4 nothing to optimize (--require-lstm), "
           "5 verification failed, 6 speedup below --min-speedup, 130 interrupted (143 on SIGTERM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# --- options shared by several commands -------------------------------------------------------------

LOADING, CHECKS, OUTPUT = "Loading the model", "Verification and benchmark", "Output"

FactoryOpt = Annotated[Optional[str], typer.Option(
    "--factory", metavar="PKG.MOD:FN", rich_help_panel=LOADING,
    help="Callable that builds the model a state dict is loaded into (the current directory is importable).")]
FactoryKwargsOpt = Annotated[Optional[str], typer.Option(
    "--factory-kwargs", metavar="JSON", rich_help_panel=LOADING,
    help='Keyword arguments for --factory, as a JSON object, e.g. \'{"hidden": 256}\'.')]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", rich_help_panel=LOADING,
    help="Allow loading a pickled module. Unpickling runs code named by the file: only for files you trust.")]
StateDictKeyOpt = Annotated[Optional[str], typer.Option(
    "--state-dict-key", metavar="KEY", rich_help_panel=LOADING,
    help="Where the weights are in a training checkpoint (e.g. state_dict, model, ema; dots for nested keys), "
         "when lstmopt cannot tell: by default it takes the one mapping of tensors that fits the model.")]
StripPrefixOpt = Annotated[Optional[str], typer.Option(
    "--strip-prefix", metavar="PREFIX", rich_help_panel=LOADING,
    help="Remove this prefix from every key of the state dict (e.g. 'module.' from DDP); by default a prefix "
         "shared by every key is stripped when that makes the keys fit.")]
ExampleInputsOpt = Annotated[Optional[Path], typer.Option(
    "--example-inputs", metavar="FILE", rich_help_panel=CHECKS,
    help="torch.save'd list of examples, each a tuple of the model's forward arguments.")]
InputShapeOpt = Annotated[Optional[str], typer.Option(
    "--input-shape", metavar="B,T,F", rich_help_panel=CHECKS,
    help="For a model taking one (batch, time, features) tensor: random inputs at 2 batch sizes x 2 lengths.")]
AtolOpt = Annotated[Optional[float], typer.Option(
    "--atol", min=0, rich_help_panel=CHECKS, help="Absolute tolerance [default: 0 for float32, 0.02 for bfloat16].")]
RtolOpt = Annotated[Optional[float], typer.Option(
    "--rtol", min=0, rich_help_panel=CHECKS, help="Relative tolerance [default: 0 for float32, 0.02 for bfloat16].")]
DtypeOpt = Annotated[Dtype, typer.Option(
    "--dtype", help="LSTM compute dtype: float32 is bit-identical; bfloat16 is faster on large shapes but "
                    "changes numerics (needs native bf16).")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT,
                                       help="Print the result as JSON on stdout (nothing else on stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUTPUT,
                                        help="Print nothing but errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", rich_help_panel=OUTPUT,
                                        help="Show tracebacks for errors.")]


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
            from .report import report_json

            sys.stdout.write(report_json(data))
            sys.stdout.flush()

    def status(self, message: str):
        """A spinner on stderr (a no-op when quiet or emitting JSON)."""
        import contextlib

        return self.err.status(message) if self.chatty else contextlib.nullcontext()


# A log (CI, a file, a pipe) does not wrap lines, and rich would squeeze tables into 80 columns there.
LOG_WIDTH = 160


def _log_width(stream) -> Optional[int]:
    """The width to print at: the terminal's (or $COLUMNS), else ``LOG_WIDTH`` for a log."""
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return LOG_WIDTH


def _kwargs(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--factory-kwargs is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    if not isinstance(value, dict):
        raise UsageError(f"--factory-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _shape(text: Optional[str]):
    from .samples import parse_shape

    return parse_shape(text) if text else None


def _samples(example_inputs: Optional[Path], input_shape: Optional[str]) -> list:
    from .samples import samples_for

    return samples_for(example_inputs, _shape(input_shape))


def _check_writable(path: Optional[Path], what: str) -> None:
    if path is not None and not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise UsageError(f"cannot write the {what} {path}: directory {path.parent} does not exist")


def _load(ui: UI, input: Path, factory: Optional[str], factory_kwargs: Optional[str], trust: bool,
          state_dict_key: Optional[str] = None, strip_prefix: Optional[str] = None):
    from .loading import load_model

    with ui.status(f"loading {input}"):
        loaded = load_model(input, factory=factory, factory_kwargs=_kwargs(factory_kwargs), trust=trust,
                            state_dict_key=state_dict_key, strip_prefix=strip_prefix)
    _say_where_the_weights_were(ui, input, loaded.state_dict_key, loaded.stripped_prefix)
    return loaded


def _say_where_the_weights_were(ui: UI, path, key: Optional[str], prefix: Optional[str]) -> None:
    if key or prefix:
        where = f"the {key!r} entry of {path}" if key else str(path)
        ui.show(f"weights: {where}" + (f", keys without the prefix {prefix!r}" if prefix else ""))


# --- commands ---------------------------------------------------------------------------------------

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


@app.command(epilog="Example: `lstmopt optimize tagger.pt -o tagger.opt.pt --factory mymodels:build_tagger "
                    "--example-inputs batches.pt --report report.json --summary summary.md`")
def optimize(
    input: Annotated[Path, typer.Argument(help="Saved model: a state dict (with --factory), a .safetensors file, "
                                                "or a pickled module (with --trust).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the optimized model.",
                                         show_default=False)],
    format: Annotated[Format, typer.Option(
        "--format", help="torchscript loads with plain torch.jit.load (no lstmopt needed); pickle needs lstmopt "
                         "and your model classes importable.")] = Format["torchscript"],
    dtype: DtypeOpt = Dtype["float32"],
    factory: FactoryOpt = None,
    factory_kwargs: FactoryKwargsOpt = None,
    trust: TrustOpt = False,
    state_dict_key: StateDictKeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    example_inputs: ExampleInputsOpt = None,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    bench: Annotated[bool, typer.Option("--bench", rich_help_panel=CHECKS,
                                        help="Also time the original against the optimized model.")] = False,
    autotune: Annotated[bool, typer.Option(
        "--autotune", rich_help_panel=CHECKS,
        help="Time each LSTM's kernels (packed oneDNN, stock nn.LSTM) on the calls it receives with the "
             "example inputs, and keep the fastest per LSTM.")] = False,
    approx: Annotated[bool, typer.Option(
        "--approx", rich_help_panel=CHECKS,
        help="With --autotune, also consider the single-step cell kernel: within 1e-6 of nn.LSTM, not "
             "bit-identical (the default tolerance becomes 1e-6).")] = False,
    min_speedup: Annotated[Optional[float], typer.Option(
        "--min-speedup", metavar="X", rich_help_panel=CHECKS,
        help="Fail (exit 6) below this speedup: geometric mean over the inputs; implies --bench.")] = None,
    require_lstm: Annotated[bool, typer.Option(
        "--require-lstm", help="Fail (exit 4) if no LSTM can be optimized, instead of warning.")] = False,
    report: Annotated[Optional[Path], typer.Option(
        "--report", metavar="FILE", rich_help_panel=OUTPUT,
        help="Write the JSON report (schema lstmopt.report/1), also when the run fails.")] = None,
    summary: Annotated[Optional[Path], typer.Option(
        "--summary", metavar="FILE", rich_help_panel=OUTPUT,
        help="Write a Markdown summary, e.g. to $GITHUB_STEP_SUMMARY.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Optimize a saved model: load it, pack its LSTMs, write it, verify it in a fresh process.

    The output appears only once it has been verified (and, with --min-speedup, timed); a failed or
    interrupted run leaves no output, and the input is never written.
    """
    from .display import benchmark_table, modules_table, verification_summary
    from .pipeline import OptimizeOptions, optimize_file
    from .report import report_markdown, write_json
    from .files import atomic_write_text

    ui = UI(quiet=quiet, json_mode=json_out)
    _check_writable(report, "report")
    _check_writable(summary, "summary")
    options = OptimizeOptions(
        input=input, output=output, format=format.value, dtype=dtype.value, factory=factory,
        factory_kwargs=_kwargs(factory_kwargs), trust=trust, state_dict_key=state_dict_key,
        strip_prefix=strip_prefix, example_inputs=example_inputs,
        input_shape=_shape(input_shape), atol=atol, rtol=rtol, benchmark=bench, min_speedup=min_speedup,
        require_lstm=require_lstm, force=force, autotune=autotune, approx=approx,
    )
    steps = {"load": "loading", "optimize": "packing LSTMs", "autotune": "timing kernels per LSTM",
             "write": f"writing {format.value}",
             "verify": "verifying in a fresh process", "benchmark": "benchmarking"}
    with ui.status("starting") as status:
        result = optimize_file(options, on_step=lambda name: status and status.update(steps.get(name, name)))
    data = result.to_dict()
    if report is not None:
        write_json(data, report)
    if summary is not None:
        atomic_write_text(summary, report_markdown(data))
    ui.emit_json(data)

    _say_where_the_weights_were(ui, input, data["input"].get("state_dict_key"), data["input"].get("stripped_prefix"))
    if data["modules"]:
        ui.show(modules_table(data["modules"]))
    if data["verification"]:
        ui.show(verification_summary(data["verification"]))
    if data["benchmark"]:
        ui.show(benchmark_table(data["benchmark"]))
    for warning in data["warnings"]:
        ui.warn(warning)
    if result.ok:
        how = data["artifact"] or {}
        method = f", {how['method']}" if how.get("method") in ("scripted", "traced") else ""
        ui.show(f"[green]wrote[/] {output} ({format.value}{method}, {data['output']['bytes'] / 1e6:.1f} MB)")
        if how.get("method") == "traced":
            ui.show(f"  traced because {how['reason']}")
        return
    raise _Failed(result.error or result.status, result.exit_code) from result.exception


class _Failed(Exception):
    """A command's outcome already reported in full; ``main`` prints the one-line error and exits."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@app.command(epilog="Example: `lstmopt inspect encoder.pt --factory mymodels:build_encoder`")
def inspect(
    input: Annotated[Path, typer.Argument(help="Saved model (same forms as for optimize).", show_default=False)],
    factory: FactoryOpt = None,
    factory_kwargs: FactoryKwargsOpt = None,
    trust: TrustOpt = False,
    state_dict_key: StateDictKeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    dtype: DtypeOpt = Dtype["float32"],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the model as a tree: each LSTM, whether lstmopt can pack it and why, parameter counts. Writes nothing."""
    import torch

    from .display import model_tree, modules_table
    from .rewrite import plan

    ui = UI(quiet=quiet, json_mode=json_out)
    loaded = _load(ui, input, factory, factory_kwargs, trust, state_dict_key, strip_prefix)
    model = loaded.model
    modules = []
    for d in plan(model, dtype=getattr(torch, dtype.value)):
        entry = d.to_dict()
        entry["parameters"] = sum(p.numel() for p in model.get_submodule(d.name).parameters())
        modules.append(entry)
    total = sum(p.numel() for p in model.parameters())
    ui.emit_json({"input": {"path": str(input), "sha256": loaded.sha256, "format": loaded.format},
                  "model": type(model).__name__, "parameters": total,
                  "lstm_parameters": sum(m["parameters"] for m in modules), "modules": modules})
    ui.show(model_tree(model, modules, label=input.name))
    if modules:
        ui.show(modules_table(modules))
        packable = sum(m["packed"] for m in modules)
        ui.show(f"{packable} of {len(modules)} LSTMs can be packed; LSTMs hold "
                f"{sum(m['parameters'] for m in modules):,} of {total:,} parameters.")
    else:
        ui.warn("the model has no nn.LSTM: there is nothing for lstmopt to optimize")


@app.command(epilog="Example: `lstmopt verify encoder.pt encoder.opt.pt --factory mymodels:build_encoder "
                    "--input-shape 8,100,40`")
def verify(
    original: Annotated[Path, typer.Argument(help="The saved original model.", show_default=False)],
    optimized: Annotated[Path, typer.Argument(
        help="The artifact lstmopt wrote. A pickle-format artifact runs code named by the file when loaded: "
             "it needs --trust, like a pickled original.", show_default=False)],
    factory: FactoryOpt = None,
    factory_kwargs: FactoryKwargsOpt = None,
    trust: TrustOpt = False,
    state_dict_key: StateDictKeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    example_inputs: ExampleInputsOpt = None,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reload OPTIMIZED in a fresh process and compare it with ORIGINAL (exit 5 above the tolerance)."""
    from .display import verification_summary
    from .loading import artifact_format
    from .verification import default_tolerance, verify_artifact
    from .writing import read_metadata

    ui = UI(quiet=quiet, json_mode=json_out)
    meta = read_metadata(optimized)
    artifact_kind = artifact_format(optimized, trust=trust)  # by content: the metadata is not proof of origin
    loaded = _load(ui, original, factory, factory_kwargs, trust, state_dict_key, strip_prefix)
    source = meta.get("source", {}).get("sha256")
    if source and source != loaded.sha256:
        ui.warn(f"{optimized} was made from a different file than {original} (sha256 {source[:12]} vs "
                f"{loaded.sha256[:12]})")
    recorded_as_ops = set((meta.get("torchscript") or {}).get("lstms_traced_as_ops", ()))
    names = [m["name"] for m in meta.get("modules", []) if m["packed"] and m["name"] not in recorded_as_ops]
    for name in names:
        try:
            loaded.model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"{original} has no module {name!r}, which {optimized} optimized; was it made from "
                             "this model?") from None
    default_atol, default_rtol = default_tolerance(meta.get("dtype", "float32"),
                                                   exact=all(m.get("exact", True) for m in meta.get("modules", [])))
    samples = _samples(example_inputs, input_shape)
    with ui.status("verifying in a fresh process"):
        result = verify_artifact(loaded.model, optimized, format=artifact_kind, samples=samples, lstm_names=names,
                                 atol=default_atol if atol is None else atol,
                                 rtol=default_rtol if rtol is None else rtol,
                                 artifact_prefix=meta.get("module_prefix", ""))
    ui.emit_json(result.to_dict())
    ui.show(verification_summary(result.to_dict()))
    if not samples:
        ui.warn("no --example-inputs or --input-shape: only each LSTM was checked, not the model as a whole")
    result.raise_if_failed()


def _sweep(values: Optional[str], default: list[int], what: str) -> list[int]:
    if not values:
        return default
    try:
        parsed = sorted({int(v) for v in values.split(",") if v.strip()})
    except ValueError:
        parsed = []
    if not parsed or parsed[0] < 1:
        raise UsageError(f"--{what} must be positive integers separated by commas, got {values!r}")
    return parsed


@app.command(epilog="Example: `lstmopt bench encoder.pt --factory mymodels:build_encoder --input-shape 8,200,40 "
                    "--plot latency.png`")
def bench(
    input: Annotated[Path, typer.Argument(help="Saved model (same forms as for optimize).", show_default=False)],
    factory: FactoryOpt = None,
    factory_kwargs: FactoryKwargsOpt = None,
    trust: TrustOpt = False,
    state_dict_key: StateDictKeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    dtype: DtypeOpt = Dtype["float32"],
    input_shape: InputShapeOpt = None,
    example_inputs: ExampleInputsOpt = None,
    seq_lens: Annotated[Optional[str], typer.Option(
        "--seq-lens", metavar="T1,T2,..", rich_help_panel=CHECKS,
        help="Sequence lengths to time [default: 1, T/8, T/2, T from --input-shape].")] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", metavar="B1,B2,..", rich_help_panel=CHECKS,
        help="Batch sizes to time [default: 1 and B from --input-shape].")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=3, rich_help_panel=CHECKS,
                                        help="Interleaved timing rounds per input.")] = 15,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, rich_help_panel=CHECKS,
                                                   help="torch intra-op threads [default: torch's].")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE.png", rich_help_panel=OUTPUT,
        help="Draw latency and speedup against sequence length (needs matplotlib: pip install lstmopt[plot]).")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Time the original model against its optimized version at several sequence lengths and batch sizes."""
    ui = UI(quiet=quiet, json_mode=json_out)
    if plot is not None:
        _check_writable(plot, "plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'lstmopt[plot]'") from None
    if example_inputs is None and input_shape is None:
        raise UsageError("bench needs inputs: pass --input-shape B,T,F (or --example-inputs FILE)")
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .benchmarking import compare_latency
    from .display import benchmark_table
    from .rewrite import optimize as optimize_model

    if threads:
        torch.set_num_threads(threads)
    loaded = _load(ui, input, factory, factory_kwargs, trust, state_dict_key, strip_prefix)
    if example_inputs is not None:
        samples = _samples(example_inputs, None)
    else:
        b, t, f = _shape(input_shape)
        lengths = _sweep(seq_lens, sorted({1, max(1, t // 8), max(1, t // 2), t}), "seq-lens")
        batches = _sweep(batch_sizes, sorted({1, b}), "batch-sizes")
        generator = torch.Generator().manual_seed(0)
        samples = [(torch.randn(bb, tt, f, generator=generator),) for bb in batches for tt in lengths]
    fast = optimize_model(loaded.model, dtype=getattr(torch, dtype.value))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=ui.err, disable=not ui.chatty, transient=True)
    with progress:
        task = progress.add_task("timing", total=len(samples))
        result = compare_latency(
            loaded.model, fast, samples, rounds=rounds,
            on_case=lambda i, case: progress.update(task, advance=1, description=f"timed {case.input}"),
        )
    data = result.to_dict()
    data["dtype"] = dtype.value
    data["input"] = {"path": str(input), "sha256": loaded.sha256}
    for case, args in zip(data["cases"], samples):
        first = args[0]
        case["batch"], case["seq_len"] = (int(first.shape[0]), int(first.shape[1])) if first.dim() >= 2 else (1, 1)
    ui.emit_json(data)
    ui.show(benchmark_table(data))
    if plot is not None:
        _plot(data, plot)
        ui.show(f"[green]wrote[/] {plot}")


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, (latency, speedup) = plt.subplots(1, 2, figsize=(11, 4))
    for batch in sorted({c["batch"] for c in data["cases"]}):
        cases = sorted((c for c in data["cases"] if c["batch"] == batch), key=lambda c: c["seq_len"])
        lengths = [c["seq_len"] for c in cases]
        latency.plot(lengths, [c["original_ms"] for c in cases], "o--", label=f"nn.LSTM, batch {batch}")
        latency.plot(lengths, [c["optimized_ms"] for c in cases], "o-", label=f"lstmopt, batch {batch}")
        speedup.plot(lengths, [c["speedup"] for c in cases], "o-", label=f"batch {batch}")
    for axis, label in ((latency, "median latency (ms)"), (speedup, "speedup (x)")):
        axis.set_xscale("log")
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    latency.set_yscale("log")
    speedup.axhline(1.0, color="grey", lw=1)
    fig.suptitle(f"{Path(data['input']['path']).name}: original vs lstmopt ({data['dtype']}, "
                 f"{data['threads']} threads)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)


@app.command(epilog="Example: `lstmopt demo --output-dir /tmp/lstmopt-demo`")
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where to put the demo's files.")] = Path("lstmopt-demo"),
    format: Annotated[Format, typer.Option("--format", help="Artifact format.")] = Format["torchscript"],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build the bundled keyword-spotter model, then optimize, verify and benchmark it (under a minute)."""
    import torch

    from .demo import INPUT_SHAPE, build_keyword_spotter

    ui = UI(quiet=quiet, json_mode=json_out)
    output_dir.mkdir(parents=True, exist_ok=True)
    source = output_dir / "keyword_spotter.pt"
    torch.save(build_keyword_spotter().state_dict(), source)
    target = output_dir / f"keyword_spotter.{format.value}.pt"
    ui.show(f"Saved the demo model's weights to {source}. Optimizing them, as this command would:")
    if ui.chatty:
        ui.out.print(f"  lstmopt optimize {source} -o {target} --factory lstmopt.demo:build_keyword_spotter "
                     f"--input-shape {','.join(map(str, INPUT_SHAPE))} --bench --require-lstm --force",
                     soft_wrap=True, style="bold")
    optimize(input=source, output=target, format=format, dtype=Dtype["float32"],
             factory="lstmopt.demo:build_keyword_spotter", factory_kwargs=None, trust=False, state_dict_key=None,
             strip_prefix=None, example_inputs=None,
             input_shape=",".join(map(str, INPUT_SHAPE)), atol=None, rtol=None, bench=True, min_speedup=None,
             autotune=False, approx=False, require_lstm=True, report=output_dir / "report.json", summary=output_dir / "summary.md", force=True,
             json_out=json_out, quiet=quiet, debug=debug)
    load = (f"torch.jit.load('{target}')" if format.value == "torchscript"
            else f"torch.load('{target}', weights_only=False)")
    ui.show(f"Report: {output_dir / 'report.json'}, summary: {output_dir / 'summary.md'}. "
            f"Load the optimized model with {load}.")


@app.command(epilog="Example: `OUT_DIR=build lstmopt batch configs/examples.yaml --jobs 2 --report batch.json "
                    "--summary batch.md`")
def batch(
    config: Annotated[Path, typer.Argument(help="YAML config: defaults and a list of jobs (see configs/).",
                                           show_default=False)],
    report: Annotated[Optional[Path], typer.Option(
        "--report", metavar="FILE", rich_help_panel=OUTPUT,
        help="Write the JSON batch report (schema lstmopt.batch-report/1; each job a lstmopt.report/1).")] = None,
    summary: Annotated[Optional[Path], typer.Option(
        "--summary", metavar="FILE", rich_help_panel=OUTPUT, help="Write a Markdown summary.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1,
                                      help="Jobs to run at once, each in its own process.")] = 1,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed job.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo jobs whose outputs are up to date, and replace "
                                                        "outputs lstmopt did not write.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Optimize every model of a YAML config; up-to-date outputs are skipped, failures do not stop the others."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .batch import run_batch
    from .config import load_config
    from .display import batch_table
    from .files import atomic_write_text
    from .report import batch_markdown, write_json

    ui = UI(quiet=quiet, json_mode=json_out)
    _check_writable(report, "report")
    _check_writable(summary, "summary")
    loaded = load_config(config)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=ui.err, disable=not ui.chatty)
    overall = progress.add_task(f"{config.name}", total=len(loaded.jobs))
    tasks: dict[int, Any] = {}

    def on_event(kind: str, index: int, payload: Any) -> None:
        name = loaded.jobs[index].name
        if kind == "start":
            tasks[index] = progress.add_task(f"  {name}: starting", total=None)
        elif kind == "step":
            progress.update(tasks[index], description=f"  {name}: {payload}")
        elif kind == "done":
            if index in tasks:
                progress.remove_task(tasks.pop(index))
            progress.advance(overall)
            if ui.chatty:
                ui.err.print(Text.assemble(_status_text(payload["status"]), f" {name}",
                                           f": {payload['error']}" if payload.get("error") else ""), soft_wrap=True)

    def write_outputs(result) -> None:
        data = result.to_dict()
        if report is not None:
            write_json(data, report)
        if summary is not None:
            atomic_write_text(summary, batch_markdown(str(config), data["jobs"]))
        ui.emit_json(data)
        ui.show(batch_table(data))

    try:
        with progress:
            result = run_batch(loaded, parallel=jobs, fail_fast=fail_fast, force=force, on_event=on_event)
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "batch_result", None)
        if partial is not None:
            write_outputs(partial)
        raise
    write_outputs(result)
    counts = result.counts()
    if result.exit_code != 0:
        failed = next(r for r in result.to_dict()["jobs"] if r["exit_code"] != 0)
        raise _Failed(f"{counts['failed']} of {counts['total']} jobs failed; first: {failed['job']}: "
                      f"{failed['error']}", result.exit_code)
    ui.show(f"[green]{counts['ok']} optimized, {counts['skipped']} up to date[/] ({counts['total']} jobs)")


def _status_text(status: str) -> Text:
    style = {"ok": "green", "skipped": "cyan", "cancelled": "yellow"}.get(status, "red")
    return Text(status, style=style)


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
        except (LstmoptError, _Failed) as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc))
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
            _error(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
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
    return typer.main.get_command(app).main(args=argv, prog_name="lstmopt", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
