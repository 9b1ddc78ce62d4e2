"""``lstmopt inspect``: the model as a tree, each LSTM's decision; writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lstmopt.choices import RECURRENT_CLASSES
from lstmopt.cli import options
from lstmopt.cli.app import app
from lstmopt.cli.options import (DebugOpt, Dtype, DtypeOpt, FactoryKwargsOpt, FactoryOpt,
                      JsonOpt, QuietOpt, StateDictKeyOpt,
                      StripPrefixOpt, TrustOpt)
from lstmopt.cli.ui import UI


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
    """Show the model as a tree: each LSTM, LSTMCell, GRU and GRUCell, whether lstmopt can pack it and why,
    parameter counts. Writes nothing."""
    import torch

    from lstmopt.reporting.display import model_tree, modules_table
    from lstmopt.rewrite.quantized import weight_count
    from lstmopt.rewrite.swap import plan

    ui = UI(quiet=quiet, json_mode=json_out)
    loaded = options.load(ui, input, factory, factory_kwargs, trust, state_dict_key, strip_prefix)
    model = loaded.model
    modules = []
    for d in plan(model, dtype=getattr(torch, dtype.value)):
        entry = d.to_dict()
        entry["parameters"] = weight_count(model.get_submodule(d.name))
        modules.append(entry)
    total = weight_count(model)
    ui.emit_json({"input": {"path": str(input), "sha256": loaded.sha256, "format": loaded.format},
                  "model": type(model).__name__, "parameters": total,
                  "lstm_parameters": sum(m["parameters"] for m in modules), "modules": modules})
    ui.show(model_tree(model, modules, label=input.name))
    if modules:
        ui.show(modules_table(modules))
        packable = sum(m["packed"] for m in modules)
        ui.show(f"{packable} of {len(modules)} recurrent modules can be packed; they hold "
                f"{sum(m['parameters'] for m in modules):,} of {total:,} parameters.")
    else:
        ui.warn(f"the model has no {RECURRENT_CLASSES}: there is nothing for lstmopt to optimize")
