"""The artifact a job writes for real model code (lstmopt/job/route.py, lstmopt/job/holdings.py): scripting, then
tracing with outputs rebuilt, then a program, then a pickle; each verified in a fresh process that also counts
what the loaded artifact holds. Models are in tests/package_patterns.py, written as packages write them."""

import json

import pytest
import torch

import package_patterns as patterns
from conftest import invoke, needs_native, run_python
from lstmopt import optimize
from lstmopt.artifacts.writing import write_artifact
from lstmopt.job.pipeline import OptimizeOptions, optimize_file
from lstmopt.modules.lstm import PackedLSTM
from lstmopt.modules.packs import tracked_copy


def _job(tmp_path, monkeypatch, build, **options):
    monkeypatch.chdir(tmp_path)
    torch.save(getattr(patterns, build)().state_dict(), "model.pt")
    return optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory=f"package_patterns:{build}",
                                         **options))


def test_a_copy_keeps_lstmopts_modules_inside_a_class_that_pickles_itself_its_own_way():
    fast = optimize(patterns.build_char_language_model())
    assert isinstance(fast.rnn, PackedLSTM)
    assert isinstance(tracked_copy(fast).rnn, PackedLSTM)  # its __setstate__ would rebuild a stock nn.LSTM


def test_a_pickle_whose_loading_undoes_the_optimization_fails_verification_with_its_cause(tmp_path, monkeypatch):
    report = _job(tmp_path, monkeypatch, "build_char_language_model", format="pickle",
                  example_inputs="package_patterns:char_language_model_inputs")
    assert report.status == "verification_failed" and report.exit_code == 5, report.error
    assert "does not hold the optimization once loaded: rnn is torch.nn.modules.rnn.LSTM after loading" in report.error
    assert "package_patterns.CharLanguageModel pickles itself its own way" in report.error
    assert "--format torchscript writes a verified artifact of this model" in report.error
    problems = report.verification["artifact_problems"]
    assert len(problems) == 1 and report.verification["ok"] is False and report.benchmark is None
    assert not (tmp_path / "out.pt").exists()


def test_by_default_that_model_is_written_as_torchscript_which_holds_its_packed_lstm(tmp_path, monkeypatch):
    report = _job(tmp_path, monkeypatch, "build_char_language_model", inputs=["int64[T=20,B=3]:0..31",
                                                                            "(float32[1,B,32], float32[1,B,32])"])
    assert report.status == "ok", report.error
    assert report.output["format"] == "torchscript" and report.artifact["blockers"] == []
    held = report.verification["artifact_holds"]["modules"]["rnn"]
    assert held["class"].startswith("lstmopt.") and held["kernel"] == "onednn" and held["kernel_live"]
    assert report.verification["max_abs_error"] == 0


def test_outputs_a_trace_cannot_return_are_rebuilt_around_it_with_their_names(tmp_path, monkeypatch):
    report = _job(tmp_path, monkeypatch, "build_tensor_in_forecaster", input_shape=(2, 12, 3))
    assert report.status == "ok", report.error
    assert report.artifact["method"] == "traced" and report.artifact["output_rebuilt"]
    assert report.artifact["module_prefix"] == "traced.model."
    assert report.verification["artifact_holds"]["modules"]["traced.model.lstm"]["class"].startswith("lstmopt.")
    # Where lstmopt is not installed: a named tuple of the dataclass's name and fields, None where it was None
    proc = run_python("""
        import json, sys
        sys.modules["lstmopt"] = None
        import torch
        out = torch.jit.load("out.pt")(torch.randn(3, 5, 3))
        print(json.dumps([type(out).__name__, list(out._fields), list(out.prediction.shape), out.state]))
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == ["Forecast", ["prediction", "state"], [3, 4], None]


def test_a_named_tuple_output_keeps_its_fields_and_constants(tmp_path):
    model = patterns.build_named_tuple_tagger()
    ids = torch.randint(0, 30, (2, 6))
    path = write_artifact(optimize(model), tmp_path / "m.pt", format="torchscript", metadata={}, samples=[(ids,)])
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        got, want = loaded(torch.randint(0, 30, (3, 9))), model(torch.randint(0, 30, (3, 9)))
    assert got._fields == want._fields and got.steps == 7 and got.logits.shape == want.logits.shape


def test_modules_forward_never_calls_do_not_block_scripting(tmp_path, monkeypatch):
    report = _job(tmp_path, monkeypatch, "build_lightning_with_metrics", input_shape=(2, 10, 3))
    assert report.status == "ok", report.error
    assert report.artifact["method"] == "scripted" and report.artifact["left_out"] == ["train_metrics", "val_metrics"]
    assert any("scripted without train_metrics, val_metrics" in w for w in report.warnings)
    assert report.verification["max_abs_error"] == 0


def test_dataclass_inputs_end_in_a_pickle_and_each_format_skipped_says_why(tmp_path, monkeypatch):
    report = _job(tmp_path, monkeypatch, "build_dataclass_forecaster",
                  example_inputs="package_patterns:dataclass_batches", benchmark=True)
    assert report.status == "ok", report.error
    assert report.output["format"] == "pickle"
    torchscript, pt2 = report.artifact["blockers"]
    assert "argument 0 of the example input holds a package_patterns.Batch object" in torchscript["reason"]
    assert "the example input holds a package_patterns.Stage at args[0].stage" in pt2["reason"]
    assert "--format" not in pt2["reason"]
    assert report.verification["samples"][0].startswith("Batch(past_target=(4, 12, 3), stage=")
    assert report.benchmark is not None and report.verification["max_abs_error"] == 0


@needs_native
def test_a_program_takes_and_returns_registered_dataclasses_and_loads_where_they_are_registered(tmp_path, monkeypatch):
    report = _job(tmp_path, monkeypatch, "build_tensor_in_forecaster", input_shape=(2, 12, 3), format="pt2")
    assert report.status == "ok", report.error
    assert report.artifact["pytree_types"] == [["package_patterns", "Forecast", "package_patterns.Forecast"]]
    assert report.verification["artifact_holds"]["ops"] == [["onednn_lstm_dense", "lstm"]]


def test_a_program_that_cannot_be_saved_is_a_one_line_error_and_the_report_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(patterns.build_dataclass_forecaster().state_dict(), "model.pt")
    result = invoke("optimize", "model.pt", "-o", "out.pt2", "--factory", "package_patterns:build_dataclass_forecaster",
                    "--example-inputs", "package_patterns:dataclass_batches", "--format", "pt2",
                    "--report", "r.json")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: a program takes tensors, numbers and strings as inputs, and the example input holds")
    assert "--format pickle writes a verified artifact of this model" in line
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exit_code"] == 2 and report["status"] == "error" and not (tmp_path / "out.pt2").exists()


def test_a_speedup_is_measured_only_for_what_was_optimized(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.nn.Linear(3, 3).state_dict(), "model.pt")
    (tmp_path / "linear.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(3, 3)\n")
    result = invoke("optimize", "model.pt", "-o", "out.pt", "--factory", "linear:build", "--input-shape", "2,4,3",
                    "--bench", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["benchmark"] is None
    assert any(w.startswith("nothing was optimized") for w in report["warnings"])
    assert any("so nothing was benchmarked" in w for w in report["warnings"])
    refused = invoke("optimize", "model.pt", "-o", "out2.pt", "--factory", "linear:build", "--input-shape", "2,4,3",
                     "--min-speedup", "1.1")
    assert refused.exit_code == 4 and "nothing to optimize" in refused.stderr


@pytest.mark.skipif(not __import__("conftest").NATIVE, reason="native kernel unavailable")
def test_the_default_passes_over_a_format_that_would_lose_the_optimization_the_model_has(tmp_path, monkeypatch):
    """A tagger fed PackedSequences: with --approx its LSTM runs the native sequence kernel, which a trace and a
    program would replace by nn.LSTM's own op; by default (nothing fast for PackedSequences either way) the
    trace is written."""
    monkeypatch.chdir(tmp_path)
    torch.save(__import__("models").build_unscriptable_tagger().state_dict(), "tagger.pt")
    g = torch.Generator().manual_seed(0)
    torch.save([(torch.randint(0, 50, (4, 11), generator=g), torch.tensor([11, 3, 7, 1]))], "in.pt")
    options = dict(input="tagger.pt", factory="models:build_unscriptable_tagger", example_inputs="in.pt")
    approx = optimize_file(OptimizeOptions(output="approx.pt", approx=True, autotune=True, **options))
    assert approx.status == "ok", approx.error
    assert approx.output["format"] == "pickle"
    torchscript, pt2 = approx.artifact["blockers"]  # (the tagger's own code is no program either)
    assert torchscript["format"] == "torchscript" and torchscript["reason"].startswith("lstm would lose its "
                                                                                      "optimization (traced as")
    assert approx.verification["artifact_holds"]["modules"]["lstm"]["sequence_kernel"] == "native"
    default = optimize_file(OptimizeOptions(output="default.pt", **options))
    assert default.status == "ok", default.error
    assert default.output["format"] == "torchscript" and default.artifact["lstms_traced_as_ops"] == ["lstm"]


def test_the_inputs_a_module_receives_are_seen_when_the_model_passes_them_by_keyword():
    # darts calls its LSTMs as lstm(input=x, hx=h): what the route judges a format by must see those calls
    from torch.nn.utils.rnn import pack_sequence

    from lstmopt import optimize, plan
    from lstmopt.job.route import Attempt, _received

    class ByKeyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 4)

        def forward(self, x, lengths):
            packed = pack_sequence([x[:n, i] for i, n in enumerate(lengths.tolist())])
            return self.lstm(input=x, hx=None)[0].sum() + self.lstm(input=packed)[0].data.sum()

    model = ByKeyword().eval()
    samples = [(torch.randn(5, 2, 3), torch.tensor([5, 3]))]
    attempt = Attempt(optimize(model), model, plan(model), samples, {}, "float32")
    assert _received(attempt) == {"lstm": {"tensor", "sequence"}}
