"""``lstmopt demo``: optimize, verify and benchmark the bundled keyword spotter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lstmopt.cli.app import app
from lstmopt.cli.optimize import optimize
from lstmopt.cli.options import DebugOpt, Dtype, Format, JsonOpt, QuietOpt
from lstmopt.cli.ui import UI


@app.command(epilog="Example: `lstmopt demo --output-dir /tmp/lstmopt-demo`")
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where to put the demo's files.")] = Path("lstmopt-demo"),
    format: Annotated[Format, typer.Option("--format", help="Artifact format.")] = Format["torchscript"],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build the bundled keyword-spotter model, then optimize, verify and benchmark it (under a minute)."""
    import io

    import torch

    from lstmopt.demo import INPUT_SHAPE, build_keyword_spotter
    from lstmopt.errors import UsageError
    from lstmopt.artifacts.files import atomic_path, write_bytes

    ui = UI(quiet=quiet, json_mode=json_out)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {output_dir}: {exc.strerror or exc}") from exc
    source = output_dir / "keyword_spotter.pt"
    weights = io.BytesIO()
    torch.save(build_keyword_spotter().state_dict(), weights)
    with atomic_path(source) as tmp:  # a rename: a symlink left at this path is replaced, never written through
        write_bytes(tmp, weights.getbuffer())
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
    import json

    written = json.loads((output_dir / "report.json").read_text())["output"]["format"]
    load = {"torchscript": f"torch.jit.load('{target}')", "pickle": f"torch.load('{target}', weights_only=False)",
            "pt2": f"torch.export.load('{target}').module() (after import lstmopt)",
            "aoti": f"torch._inductor.aoti_load_package('{target}') (after import lstmopt)"}[written]
    ui.show(f"Report: {output_dir / 'report.json'}, summary: {output_dir / 'summary.md'}. "
            f"Load the optimized model with {load}.")
