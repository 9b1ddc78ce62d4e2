"""``lstmopt verify``: reload an artifact in a fresh process and compare it with the original."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lstmopt.errors import UsageError
from lstmopt.cli import options
from lstmopt.cli.app import app
from lstmopt.cli.options import (AtolOpt, DebugOpt, ExampleInputsOpt, FactoryKwargsOpt, FactoryOpt,
                      InputOpt, InputShapeOpt, JsonOpt, QuietOpt, RtolOpt, SeedOpt, StateDictKeyOpt,
                      StripPrefixOpt, TrustOpt)
from lstmopt.cli.ui import UI


@app.command(epilog="Example: `lstmopt verify encoder.pt encoder.opt.pt --factory mymodels:build_encoder "
                    "--input-shape 8,100,40`")
def verify(
    original: Annotated[Path, typer.Argument(help="The saved original model.", show_default=False)],
    optimized: Annotated[Path, typer.Argument(
        help="The artifact lstmopt wrote. Loading it runs code from the file (a TorchScript archive's methods, "
             "a pickle's classes): it needs --trust, like a pickled original.", show_default=False)],
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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reload OPTIMIZED in a fresh process and compare it with ORIGINAL (exit 5 above the tolerance)."""
    from lstmopt.reporting.display import verification_summary
    from lstmopt.artifacts.loading import artifact_format
    from lstmopt.artifacts.metadata import calls_lstmopt_ops, read_metadata
    from lstmopt.job.verification import check_deterministic, default_tolerance, verify_artifact

    ui = UI(quiet=quiet, json_mode=json_out)
    artifact_kind = artifact_format(optimized, trust=trust)  # by content: the metadata is not proof of origin
    meta = read_metadata(optimized)
    loaded = options.load(ui, original, factory, factory_kwargs, trust, state_dict_key, strip_prefix)
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
    exact = all(m.get("exact", True) for m in meta.get("modules", []))
    # int8 artifacts carry the tolerance derived from the errors measured when they were made
    derived = meta.get("low_precision") or {}
    default_atol, default_rtol = ((derived["atol"], derived["rtol"]) if "atol" in derived
                                  else default_tolerance(meta.get("dtype", "float32"), exact=exact))
    samples = options.load_samples(example_inputs, input_shape, input_specs)
    check_deterministic(loaded.model.eval(), samples, seed, from_shape=input_shape is not None or bool(input_specs))
    with ui.status("verifying in a fresh process"):
        result = verify_artifact(loaded.model, optimized, format=artifact_kind, samples=samples, lstm_names=names,
                                 atol=default_atol if atol is None else atol,
                                 rtol=default_rtol if rtol is None else rtol,
                                 artifact_prefix=meta.get("module_prefix", ""),
                                 # what the archive's own code calls, not what its metadata claims
                                 native_kernel=artifact_kind != "pickle" and calls_lstmopt_ops(optimized),
                                 seed=seed, float64_reference=(not exact and meta.get("dtype", "float32") == "float32"
                                                               and atol is None and rtol is None),
                                 # what the artifact claims it holds, counted in what loads
                                 **_expected_holdings(meta, artifact_kind))
    ui.emit_json(result.to_dict())
    ui.show(verification_summary(result.to_dict()))
    if not samples:
        ui.warn("no --example-inputs or --input-shape: only each LSTM was checked, not the model as a whole")
    result.raise_if_failed()


def _expected_holdings(meta: dict, kind: str) -> dict:
    """What the artifact's metadata says it holds, as ``verify_artifact`` checks it in the fresh process."""
    from lstmopt.job import holdings

    decisions = holdings.as_decisions(meta.get("modules", []))
    program = (meta.get("pt2") or {})
    if kind in ("pt2", "aoti"):
        return {"expected_ops": holdings.expected_ops(decisions),
                "pytree_types": [tuple(t) for t in program.get("pytree_types", ())]}
    return {"expected_modules": holdings.expected_modules(decisions)}
