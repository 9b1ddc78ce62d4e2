"""Models whose code TorchScript cannot compile still get a TorchScript artifact: traced, with every LSTM
scripted, so the packed op and a free batch size and sequence length survive in the archive."""

import pytest
import torch

from conftest import invoke, run_python_json
from lstmopt import optimize
from lstmopt.errors import UsageError
from lstmopt.job.pipeline import OptimizeOptions, optimize_file
from lstmopt.artifacts.writing import read_metadata, write_artifact
import models
from models import UnscriptableForecaster, build_unscriptable_forecaster, build_unscriptable_tagger


def _fresh_process_results(artifact, cases, tmp_path, key):
    """Outputs of the artifact loaded by plain torch.jit.load where lstmopt cannot be imported."""
    torch.save(cases, tmp_path / "cases.pt")
    return run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None
        import torch
        m = torch.jit.load({str(artifact)!r})
        graph = m.graph.copy()
        torch._C._jit_pass_inline(graph)
        cases = torch.load({str(tmp_path / 'cases.pt')!r})
        with torch.no_grad():
            equal = [torch.equal(m(*args)[{key!r}], expected) for args, expected in cases]
        print(json.dumps({{"equal": equal, "packed_op": "aten::mkldnn_rnn_layer" in str(graph)}}))
    """)


def test_an_unscriptable_forecaster_is_traced_and_stays_exact_at_other_shapes(tmp_path):
    model = build_unscriptable_forecaster().eval()
    with pytest.raises(Exception):
        torch.jit.script(model)  # the premise
    out = write_artifact(optimize(model), tmp_path / "m.pt", format="torchscript", metadata={},
                         samples=[(torch.randn(4, 20, 3),)])
    how = read_metadata(out)["torchscript"]
    assert how["method"] == "traced" and "not scriptable" in how["reason"] and "**options" in how["reason"]
    cases = []
    with torch.no_grad():
        for batch, steps in [(1, 6), (7, 33), (4, 20), (2, 3)]:  # none but (4, 20) was traced
            x = torch.randn(batch, steps, 3)
            cases.append(((x,), model(x)["forecast"]))
    result = _fresh_process_results(out, cases, tmp_path, "forecast")
    assert result == {"equal": [True] * 4, "packed_op": True}


def test_an_unscriptable_tagger_on_packed_sequences_is_traced_with_nn_lstms_own_op(tmp_path):
    model = build_unscriptable_tagger().eval()
    g = torch.Generator().manual_seed(0)
    example = (torch.randint(0, 50, (4, 11), generator=g), torch.tensor([11, 3, 7, 1]))
    out = write_artifact(optimize(model), tmp_path / "m.pt", format="torchscript", metadata={}, samples=[example])
    cases = []
    with torch.no_grad():
        for batch, steps in [(1, 5), (6, 30)]:
            args = (torch.randint(0, 50, (batch, steps), generator=g), torch.randint(1, steps + 1, (batch,), generator=g))
            cases.append((args, model(*args)["scores"]))
    assert _fresh_process_results(out, cases, tmp_path, "scores")["equal"] == [True, True]


def test_without_inputs_tracing_is_impossible_and_the_error_says_what_to_pass(tmp_path):
    with pytest.raises(UsageError) as info:
        write_artifact(optimize(UnscriptableForecaster()), tmp_path / "m.pt", format="torchscript", metadata={})
    message = str(info.value)
    assert "not scriptable" in message and "--example-inputs" in message and "--input-shape" in message
    assert "--format pt2 or pickle" in message and "\n" not in message and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_the_pipeline_reports_how_the_artifact_was_made(tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    torch.save(build_unscriptable_forecaster().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", format=fmt,
                                           factory="models:build_unscriptable_forecaster", input_shape=(3, 24, 3)))
    assert report.status == "ok", report.error
    assert report.verification["ok"] and report.verification["max_abs_error"] == 0
    if fmt == "torchscript":
        assert report.artifact["method"] == "traced" and "not scriptable" in report.artifact["reason"]
        assert any("traced" in w and "frozen" in w for w in report.warnings)
    else:
        assert report.artifact["method"] == "pickled" and not report.warnings


def test_a_trace_that_specialized_fails_verification_and_says_why_and_which_format_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(__import__("models").build_branches_on_length().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:build_branches_on_length",
                                           input_shape=(2, 16, 3), format="torchscript"))  # lengths 16 and 4
    assert report.status == "verification_failed" and report.exit_code == 5
    assert "trace specialized" in report.error and "scripting it failed: the model's code is not scriptable" in report.error
    assert "(at models.py:" in report.error  # the blocker, by file and line
    # A program specializes to the branch as well (torch.export guards the length): only a pickle holds it
    assert "--format pickle writes a verified artifact of this model" in report.error
    assert not (tmp_path / "out.pt").exists()


def test_by_default_a_model_no_trace_nor_program_holds_is_pickled_and_the_report_says_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(__import__("models").build_branches_on_length().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:build_branches_on_length",
                                           input_shape=(2, 16, 3)))
    assert report.status == "ok", report.error
    assert report.output["format"] == "pickle" and report.artifact["requested_format"] == "auto"
    assert [b["format"] for b in report.artifact["blockers"]] == ["torchscript", "pt2"]
    assert "trace specialized" in report.artifact["blockers"][0]["reason"]
    assert any(w.startswith("wrote pickle, not torchscript: torchscript: ") and "; pt2: " in w for w in report.warnings)
    assert report.verification["ok"] and report.verification["max_abs_error"] == 0
    assert report.verification["artifact_holds"]["modules"]["lstm"]["class"] == "lstmopt.modules.lstm.PackedLSTM"


def test_the_cli_says_the_artifact_was_traced_and_why(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lstmopt.cli import app

    monkeypatch.chdir(tmp_path)
    torch.save(build_unscriptable_forecaster().state_dict(), "model.pt")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "optimize", "model.pt", "-o", "out.pt", "--factory", "models:build_unscriptable_forecaster",
        "--input-shape", "2,12,3"])
    assert result.exit_code == 0, result.output
    assert "(torchscript, traced," in result.stdout and "traced because the model's code is not scriptable" in result.stdout
    assert "frozen as they were on the example inputs" in result.stderr


@pytest.mark.parametrize("factory, method", [("models:build_rolled_decoder", "traced"),
                                             ("models:build_flattening_wrapper", "traced"),
                                             ("models:build_lightning_forecaster", "scripted")])
def test_real_world_model_code_gets_a_verified_torchscript_artifact(tmp_path, factory, method):
    import importlib

    module, _, name = factory.partition(":")
    torch.save(getattr(importlib.import_module(module), name)().state_dict(), tmp_path / "m.pt")
    report = optimize_file(OptimizeOptions(input=tmp_path / "m.pt", output=tmp_path / "m.ts.pt", factory=factory,
                                           input_shape=(4, 30, 7)))
    assert report.ok, report.error
    assert report.artifact["method"] == method and report.verification["ok"]


def test_a_scripted_packed_lstm_takes_flatten_parameters():
    scripted = torch.jit.script(optimize(torch.nn.LSTM(3, 4)))
    scripted.flatten_parameters()  # a no-op, as nn.LSTM's is on CPU


def test_when_scripting_and_tracing_both_fail_the_error_keeps_both_reasons_and_suggests_pickle(tmp_path):
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 4)

        def forward(self, x, **kwargs):
            out, _ = self.lstm(x)
            return {"out": out, "note": object()}  # a trace cannot return a Python object

    with pytest.raises(UsageError) as caught:
        write_artifact(optimize(Untraceable()), tmp_path / "m.pt", format="torchscript", metadata={},
                       samples=[(torch.randn(5, 2, 3),)])
    message = str(caught.value)
    assert "not scriptable" in message and "tracing it failed too" in message and "--format pt2 or pickle" in message
    assert "its output holds a builtins.object object" in message


@pytest.mark.skipif(not __import__("conftest").NATIVE, reason="native kernel unavailable")
def test_a_traced_lstm_fed_packed_sequences_is_reported_as_what_the_artifact_runs(tmp_path):
    from lstmopt.artifacts.metadata import calls_lstmopt_ops

    g = torch.Generator().manual_seed(0)
    torch.save(build_unscriptable_tagger().state_dict(), tmp_path / "tagger.pt")
    torch.save([(torch.randint(0, 50, (4, 11), generator=g), torch.tensor([11, 3, 7, 1]))], tmp_path / "in.pt")
    report = optimize_file(OptimizeOptions(input=tmp_path / "tagger.pt", output=tmp_path / "t.ts.pt",
                                           factory="models:build_unscriptable_tagger",
                                           example_inputs=tmp_path / "in.pt", autotune=True, approx=True,
                                           format="torchscript"))  # by default, a format that keeps the kernels
    assert report.ok, report.error
    assert report.artifact["lstms_traced_as_ops"] == ["lstm"]
    (row,) = report.modules
    assert (row["kernel"], row["sequence_kernel"], row["exact"]) == ("stock", "stock", True)
    assert "traced as nn.LSTM's own op" in row["reason"]
    assert report.verification["atol"] == 0  # it runs nn.LSTM's op: held to bit-identity
    meta = read_metadata(tmp_path / "t.ts.pt")
    assert meta["native_kernel"] == [] and meta["modules"][0]["sequence_kernel"] == "stock"
    assert not calls_lstmopt_ops(tmp_path / "t.ts.pt")  # and it needs no library it does not use
    assert not any("native kernel" in w for w in report.warnings)


@pytest.mark.parametrize("model", ["SamplingForecaster", "PrenetDecoder"])
@pytest.mark.parametrize("format", ["torchscript", "pickle"])
def test_a_model_that_samples_is_named_as_the_cause_and_verifies_with_a_seed(tmp_path, monkeypatch, model, format):
    monkeypatch.chdir(tmp_path)
    torch.save(getattr(models, model)().state_dict(), "model.pt")
    options = dict(input="model.pt", factory=f"models:{model}", input_shape=(2, 7, 3 if model != "PrenetDecoder" else 8),
                   format=format)
    report = optimize_file(OptimizeOptions(output="out.pt", **options))
    assert report.exit_code == 5 and not (tmp_path / "out.pt").exists()
    assert report.error.startswith("the model is not deterministic in eval mode: two runs of the original")
    assert "--seed N" in report.error and "traced" not in report.error
    report = optimize_file(OptimizeOptions(output="seeded.pt", seed=0, **options))
    assert report.ok, report.error
    assert report.verification["max_abs_error"] == 0 and report.to_dict()["options"]["seed"] == 0
    shape = ",".join(map(str, options["input_shape"]))
    verify = ["verify", "model.pt", "seeded.pt", "--factory", options["factory"], "--input-shape", shape, "--trust"]
    assert invoke(*verify, "--seed", "0").exit_code == 0
    unseeded = invoke(*verify)
    assert unseeded.exit_code == 5 and "not deterministic in eval mode" in unseeded.stderr


def test_randomness_no_seed_reaches_is_said_to_come_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(models.ClockNoise().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:ClockNoise",
                                           input_shape=(2, 7, 3), seed=3))
    assert report.exit_code == 5 and "not deterministic even when its random generators are seeded with 3" in report.error


def test_the_tracing_warning_mentions_lstms_only_where_there_are_some(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(models.UnscriptableScaler().state_dict(), "plain.pt")
    report = optimize_file(OptimizeOptions(input="plain.pt", output="plain.ts.pt", factory="models:UnscriptableScaler",
                                           input_shape=(2, 3, 4)))
    assert report.ok and report.artifact["method"] == "traced", report.error
    (caveat,) = [w for w in report.warnings if w.startswith("the artifact was traced")]
    assert "LSTM" not in caveat
    torch.save(build_unscriptable_forecaster().state_dict(), "forecaster.pt")
    report = optimize_file(OptimizeOptions(input="forecaster.pt", output="f.ts.pt",
                                           factory="models:build_unscriptable_forecaster", input_shape=(2, 8, 3)))
    (caveat,) = [w for w in report.warnings if w.startswith("the artifact was traced")]
    assert caveat.endswith("(each of its 2 LSTMs is scripted and stays free)")


def test_an_input_shape_the_model_does_not_take_suggests_example_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(models.WaveformDetector().state_dict(), "vad.pt")
    report = optimize_file(OptimizeOptions(input="vad.pt", output="out.pt", factory="models:WaveformDetector",
                                           input_shape=(2, 400, 1)))  # (batch, time, features): not what it takes
    assert report.exit_code == 2 and not (tmp_path / "out.pt").exists()
    assert "the original model fails on example input 0" in report.error and "--example-inputs" in report.error


def test_a_factory_class_defined_inside_a_function_cannot_be_pickled_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "local_factory.py").write_text(
        "from torch import nn\n\ndef build():\n    class Net(nn.Module):\n        def __init__(self):\n"
        "            super().__init__()\n            self.lstm = nn.LSTM(4, 8, batch_first=True)\n\n"
        "        def forward(self, x):\n            return self.lstm(x)[0]\n    return Net()\n")
    import local_factory

    torch.save(local_factory.build().state_dict(), "m.pt")
    report = optimize_file(OptimizeOptions(input="m.pt", output="out.pt", factory="local_factory:build",
                                           input_shape=(2, 5, 4), format="pickle"))
    assert report.exit_code == 2 and not (tmp_path / "out.pt").exists()
    assert "cannot write the model as a pickle" in report.error and "--format torchscript" in report.error
    assert optimize_file(OptimizeOptions(input="m.pt", output="out.ts.pt", factory="local_factory:build",
                                         input_shape=(2, 5, 4))).ok  # TorchScript takes such classes
