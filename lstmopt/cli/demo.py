"""``lstmopt demo``: the bundled keyword spotter optimized three ways (exact, ``--autotune --approx``, ``--dtype
int8``), each verified and timed, in one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lstmopt.cli.app import Failed, app
from lstmopt.cli.options import DebugOpt, Format, JsonOpt, QuietOpt
from lstmopt.cli.ui import UI

# (the row's name, the file suffix, the flags a user would add, OptimizeOptions fields)
RUNS = [("default", "", "", {}),
        ("--autotune --approx", ".approx", " --autotune --approx", {"autotune": True, "approx": True}),
        ("--dtype int8", ".int8", " --dtype int8", {"dtype": "int8"})]
FACTORY, INPUTS = "lstmopt.demo:build_keyword_spotter", "lstmopt.demo:demo_inputs"


@app.command(epilog="Example: `lstmopt demo --output-dir /tmp/lstmopt-demo`")
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir",
                                             help="Where to put the demo's files.")] = Path("lstmopt-demo"),
    format: Annotated[Format, typer.Option("--format", help="Artifact format.")] = Format["torchscript"],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Optimize the bundled keyword spotter three ways (bit-identical; --autotune --approx; --dtype int8), verify
    each in a fresh process and time it on one streaming frame and one second of audio (about a minute)."""
    from lstmopt.job.pipeline import OptimizeOptions, optimize_file
    from lstmopt.reporting.display import demo_table
    from lstmopt.reporting.report import report_markdown, write_json
    from lstmopt.artifacts.files import atomic_write_text

    ui = UI(quiet=quiet, json_mode=json_out)
    source = _save_model(output_dir)
    ui.show(f"Saved the demo model (40 features -> 2-layer LSTM of 128 units -> 12 keyword scores) to {source}. "
            "Optimizing it three ways, as these commands would:")
    reports = []
    for name, suffix, flags, fields in RUNS:
        target = output_dir / f"keyword_spotter{suffix}.{format.value}.pt"
        if ui.chatty:
            ui.out.print(f"  lstmopt optimize {source} -o {target} --factory {FACTORY} --example-inputs {INPUTS} "
                         f"--format {format.value} --bench --require-lstm --force{flags}", soft_wrap=True, style="bold")
        with ui.status(f"{name}: optimizing, verifying in a fresh process, timing"):
            report = optimize_file(OptimizeOptions(input=source, output=target, format=format.value, factory=FACTORY,
                                                   example_inputs=INPUTS, benchmark=True, require_lstm=True,
                                                   force=True, **fields))
        data = report.to_dict()
        write_json(data, output_dir / f"report{suffix}.json")
        reports.append((name, data))
    atomic_write_text(output_dir / "summary.md", "\n".join(report_markdown(data) for _, data in reports))
    ui.emit_json({"runs": {name: data for name, data in reports}})
    ui.show(demo_table(reports))
    failed = [(name, data) for name, data in reports if data["exit_code"] != 0]
    if failed:
        name, data = failed[0]
        raise Failed(f"the {name} run failed: {data['error']}", data["exit_code"])
    ui.show(f"Reports: {output_dir}/report*.json, summary: {output_dir / 'summary.md'}. Load an artifact with "
            "torch.jit.load(path); for the --approx and int8 ones, after `import lstmopt.native; "
            "lstmopt.native.load()` (they run lstmopt's native kernel).")


def _save_model(output_dir: Path) -> Path:
    """The keyword spotter's state dict, as a user's training run would save it."""
    import io

    import torch

    from lstmopt.artifacts.files import atomic_path, write_bytes
    from lstmopt.demo import build_keyword_spotter
    from lstmopt.errors import UsageError

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {output_dir}: {exc.strerror or exc}") from exc
    source = output_dir / "keyword_spotter.pt"
    weights = io.BytesIO()
    torch.save(build_keyword_spotter().state_dict(), weights)
    with atomic_path(source) as tmp:  # a rename: a symlink left at this path is replaced, never written through
        write_bytes(tmp, weights.getbuffer())
    return source
