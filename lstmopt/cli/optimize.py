"""``lstmopt optimize``: a saved model in, a verified optimized artifact out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lstmopt.cli import options
from lstmopt.cli.app import Failed, app
from lstmopt.cli.options import (AtolOpt, CHECKS, DebugOpt, Dtype, DtypeOpt, ExampleInputsOpt, FactoryKwargsOpt, FactoryOpt,
                      Format, InputOpt, InputShapeOpt, JsonOpt, OUTPUT, QuietOpt, RtolOpt, SeedOpt, StateDictKeyOpt,
                      StripPrefixOpt, TrustOpt)
from lstmopt.cli.ui import UI
from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.kernels.table import approximate_kernels_text


@app.command(epilog="Example: `lstmopt optimize tagger.pt -o tagger.opt.pt --factory mymodels:build_tagger "
                    "--example-inputs batches.pt --report report.json --summary summary.md`")
def optimize(
    input: Annotated[Path, typer.Argument(help="Saved model: a state dict (with --factory), a .safetensors file, "
                                                "or a pickled module (with --trust).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the optimized model.",
                                         show_default=False)],
    format: Annotated[Format, typer.Option(
        "--format", help="auto writes the first of torchscript, pt2 and pickle that holds the model and verifies, "
                         "and says why it skipped any; torchscript loads with plain torch.jit.load (no lstmopt "
                         "needed); pickle needs lstmopt and your model classes importable; pt2 is a torch.export "
                         "program (torch.export.load, after import lstmopt or torch.ops.load_library where it "
                         "calls lstmopt's ops); aoti is that program compiled by AOTInductor for this machine's "
                         "CPU (needs a C++ compiler here, none where it runs).")] = Format["auto"],
    dtype: DtypeOpt = Dtype["float32"],
    factory: FactoryOpt = None,
    factory_kwargs: FactoryKwargsOpt = None,
    trust: TrustOpt = False,
    state_dict_key: StateDictKeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    example_inputs: ExampleInputsOpt = None,
    input_shape: InputShapeOpt = None,
    input_specs: InputOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = None,
    bench: Annotated[bool, typer.Option("--bench", rich_help_panel=CHECKS,
                                        help="Also time the original against the optimized model.")] = False,
    autotune: Annotated[bool, typer.Option(
        "--autotune", rich_help_panel=CHECKS,
        help="Time each LSTM's kernels (packed oneDNN, stock nn.LSTM) on the calls it receives with the "
             "example inputs, and keep the fastest per LSTM.")] = False,
    approx: Annotated[bool, typer.Option(
        "--approx", rich_help_panel=CHECKS,
        help="Allow the approximate kernels, not bit-identical: "
             f"{approximate_kernels_text()}. LSTMCells, GRUCells, GRUs, RNNs and LSTMs with proj_size > 0 then "
             "run the native kernel; with --autotune, every LSTM may get one where it measures faster. Verification holds them to their "
             f"contract, {CONTRACT} (--atol/--rtol set a tolerance instead).")] = False,
    min_speedup: Annotated[Optional[float], typer.Option(
        "--min-speedup", metavar="X", rich_help_panel=CHECKS,
        help="Fail (exit 6) below this speedup (geometric mean over the inputs) when the timing noise allows no "
             "doubt: its whole 95% interval lies below X; implies --bench.")] = None,
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
    from lstmopt.reporting.display import benchmark_table, modules_table, verification_summary
    from lstmopt.job.pipeline import OptimizeOptions, optimize_file
    from lstmopt.reporting.report import report_markdown, write_json
    from lstmopt.artifacts.files import atomic_write_text, check_paths

    ui = UI(quiet=quiet, json_mode=json_out)
    check_paths({"the input": input, "the example inputs": options.example_inputs_file(example_inputs)},
                {"the output": output, "the report": report, "the summary": summary})
    job = OptimizeOptions(
        input=input, output=output, format=format.value, dtype=dtype.value, factory=factory,
        factory_kwargs=options.parse_kwargs(factory_kwargs), trust=trust, state_dict_key=state_dict_key,
        strip_prefix=strip_prefix, example_inputs=example_inputs,
        input_shape=options.parse_shape(input_shape), inputs=input_specs or None, atol=atol, rtol=rtol, benchmark=bench, min_speedup=min_speedup,
        require_lstm=require_lstm, force=force, autotune=autotune, approx=approx, seed=seed,
    )
    steps = {"load": "loading", "optimize": "packing LSTMs", "autotune": "timing kernels per LSTM",
             "write": "writing the artifact",
             "verify": "verifying in a fresh process", "benchmark": "benchmarking"}
    with ui.status("starting") as status:
        result = optimize_file(job, on_step=lambda name: status and status.update(steps.get(name, name)))
    data = result.to_dict()
    if report is not None:
        write_json(data, report)
    if summary is not None:
        atomic_write_text(summary, report_markdown(data))
    ui.emit_json(data)

    options.say_where_the_weights_were(ui, input, data["input"].get("state_dict_key"), data["input"].get("stripped_prefix"))
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
        ui.show(f"[green]wrote[/] {output} ({data['output']['format']}{method}, {data['output']['bytes'] / 1e6:.1f} MB)")
        if how.get("method") == "traced":
            ui.show(f"  traced because {how['reason']}")
        return
    message = result.error or result.status
    if result.exit_code == 1 and not debug:  # lstmopt's own bug: the traceback is for its maintainers
        message += " (re-run with --debug for the traceback)"
    raise Failed(message, result.exit_code) from result.exception
