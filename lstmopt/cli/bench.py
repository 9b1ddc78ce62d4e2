"""``lstmopt bench``: time the original against the optimized model over lengths and batch sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lstmopt.errors import UsageError
from lstmopt.cli import options
from lstmopt.cli.app import app
from lstmopt.cli.options import (CHECKS, DebugOpt, Dtype, DtypeOpt, ExampleInputsOpt, FactoryKwargsOpt, FactoryOpt,
                      InputOpt, InputShapeOpt, JsonOpt, OUTPUT, QuietOpt, StateDictKeyOpt,
                      StripPrefixOpt, TrustOpt)
from lstmopt.cli.ui import UI


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
    input_specs: InputOpt = None,
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
        from lstmopt.artifacts.files import check_paths

        check_paths({"the model": input, "the example inputs": options.example_inputs_file(example_inputs)},
                    {"the plot": plot})
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'lstmopt[plot]'") from None
    if example_inputs is None and input_shape is None and not input_specs:
        raise UsageError("bench needs inputs: pass --input-shape B,T,F (or --example-inputs, or --input)")
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lstmopt.job.benchmarking import compare_latency
    from lstmopt.reporting.display import benchmark_table
    from lstmopt.rewrite.swap import optimize as optimize_model

    if threads:
        torch.set_num_threads(threads)
    loaded = options.load(ui, input, factory, factory_kwargs, trust, state_dict_key, strip_prefix)
    if example_inputs is not None or input_specs:
        samples = options.load_samples(example_inputs, None, input_specs)
    else:
        b, t, f = options.parse_shape(input_shape)
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

    from lstmopt.artifacts.files import atomic_path

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
