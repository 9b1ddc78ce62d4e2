"""End to end: saved model in, verified optimized artifact out, reloaded in a fresh process."""

import hashlib
import json
import sys

import pytest
import torch

from conftest import APPROX_EXTRA, ROOT, needs_bf16, run_python_json
from lstmopt.job.pipeline import OptimizeOptions, optimize_file
from lstmopt.job.verification import Verification, verify_artifact
from lstmopt.artifacts.writing import read_metadata, write_artifact
from lstmopt import native, optimize
from models import Encoder, build_forecaster, build_speech_encoder, build_tagger


def tagger_inputs(path):
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 50, (b, t), generator=g), torch.randint(1, t + 1, (b,), generator=g))
               for b, t in [(1, 5), (4, 30), (8, 12)]]
    torch.save(samples, path)
    return samples


ARCHITECTURES = {
    # name: (factory, options that give sample inputs)
    "speech_encoder": ("models:build_speech_encoder", {"input_shape": (4, 60, 40)}),
    "tagger": ("models:build_tagger", {"example_inputs": "tagger_inputs.pt"}),
    "forecaster": ("models:build_forecaster", {"input_shape": (3, 24, 3)}),
}
BUILDERS = {"speech_encoder": build_speech_encoder, "tagger": build_tagger, "forecaster": build_forecaster}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_round_trip(tmp_path, monkeypatch, name, fmt):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user would type them
    factory, sample_options = ARCHITECTURES[name]
    model = BUILDERS[name]().eval()
    torch.save(model.state_dict(), "model.pt")
    before = sha(tmp_path / "model.pt")
    if "example_inputs" in sample_options:
        samples = tagger_inputs(tmp_path / sample_options["example_inputs"])
    else:
        b, t, f = sample_options["input_shape"]
        samples = [(torch.randn(b, t, f),), (torch.randn(1, t // 2, f),)]

    report = optimize_file(OptimizeOptions(input="model.pt", output=f"out.{fmt}", format=fmt, factory=factory,
                                           **sample_options))
    assert report.status == "ok", report.error
    verification = report.verification
    assert verification["ok"] and verification["atol"] == 0 and verification["max_abs_error"] == 0
    assert len(verification["samples"]) >= 3 and verification["lstm_outputs"]
    assert sha(tmp_path / "model.pt") == before  # the input is never touched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files

    meta = read_metadata(tmp_path / f"out.{fmt}")
    assert meta["source"]["sha256"] == before and meta["dtype"] == "float32" and meta["format"] == fmt
    assert meta["torch"] == torch.__version__ and meta["lstmopt"]
    assert [m["name"] for m in meta["modules"] if m["packed"]]

    # Independently of lstmopt's own verification: a fresh process, lstmopt blocked for TorchScript.
    with torch.no_grad():
        torch.save({"samples": samples, "expected": [model(*s) for s in samples]}, tmp_path / "io.pt")
    result = run_python_json(f"""
        import json, sys
        {'sys.modules["lstmopt"] = None' if fmt == 'torchscript' else ''}
        import torch
        fmt = {fmt!r}
        m = torch.jit.load("out.{fmt}") if fmt == "torchscript" else torch.load("out.{fmt}", weights_only=False)
        io = torch.load("io.pt")
        with torch.no_grad():
            equal = [torch.equal(m(*s), e) for s, e in zip(io["samples"], io["expected"])]
        print(json.dumps(equal))
    """, cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT / "tests")})
    assert result == [True] * len(samples)


def test_verification_computes_both_sides_at_the_callers_thread_count(tmp_path):
    # A batch worker runs at cpu_count / jobs threads, while the fresh process it verifies in starts at
    # torch's default; results differ in their last bits across thread counts: where depends on the CPU
    # (the LSTM on some, a linear layer over 1024 features for few rows on others), so the test has both.
    result = run_python_json(f"""
        import json, torch
        from lstmopt import optimize
        from lstmopt.job.verification import verify_artifact
        from lstmopt.artifacts.writing import write_artifact
        from models import build_tagger
        wanted = 1 if torch.get_num_threads() > 1 else 2
        model = build_tagger(hidden=512).eval()
        g = torch.Generator().manual_seed(0)
        samples = [(torch.randint(0, 50, (b, t), generator=g), torch.randint(1, t + 1, (b,), generator=g))
                   for b, t in [(32, 60), (4, 16)]]
        with torch.no_grad():
            at_default = [model(*sample) for sample in samples]
            torch.set_num_threads(wanted)
            at_wanted = [model(*sample) for sample in samples]
        out = write_artifact(optimize(model), {str(tmp_path / 'm.pt')!r}, format="torchscript", metadata={{}})
        v = verify_artifact(model, out, format="torchscript", samples=samples, lstm_names=["lstm"]).to_dict()
        print(json.dumps({{"differs": not all(map(torch.equal, at_default, at_wanted)), "wanted": wanted,
                           "ok": v["ok"], "threads": v["threads"], "error": v["max_abs_error"]}}))
    """, env_extra={"PYTHONPATH": str(ROOT / "tests")})
    assert result["differs"]  # the premise: this model's last bits depend on the thread count
    assert result["ok"] and result["error"] == 0 and result["threads"] == result["wanted"]


def test_model_level_failure_is_reported_per_output(tmp_path):
    original = Encoder().eval()
    tampered = Encoder().eval()
    tampered.load_state_dict(original.state_dict())
    with torch.no_grad():
        tampered.head.bias.add_(1e-3)
    out = write_artifact(optimize(tampered), tmp_path / "m.pt", format="torchscript", metadata={})
    result = verify_artifact(original, out, format="torchscript", samples=[(torch.randn(2, 5, 16),)],
                             lstm_names=["lstm"], atol=1e-4, rtol=0)
    assert not result.ok
    failed = result.failures()
    assert [c.name.split(" ")[0] for c in failed] == ["sample"]  # the LSTM itself is fine
    assert 9e-4 < failed[0].max_abs_error < 1.1e-3 and failed[0].max_rel_error > 0
    with pytest.raises(Exception, match=r"differs from the original in 1 output\(s\); worst: sample 0"):
        result.raise_if_failed()


def test_a_wrong_lstm_is_caught_by_its_own_synthetic_inputs(tmp_path):
    original = Encoder().eval()
    fast = optimize(original)
    with torch.no_grad():
        fast.lstm.weight_hh_l1.mul_(1.01)
    out = write_artifact(fast, tmp_path / "m.pt", format="pickle", metadata={})
    result = verify_artifact(original, out, format="pickle", samples=[], lstm_names=["lstm"])
    assert not result.ok and len(result.lstm_checks) == 15  # 5 cases x (output, h_n, c_n)
    failed = {" ".join(c.name.split(" ")[:3]) for c in result.failures()}
    # layer 1's recurrent weights only matter from the second step on, or with a given state
    assert failed == {"lstm case 1", "lstm case 3", "lstm case 4"}


def test_verification_failure_leaves_no_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_forecaster().state_dict(), "model.pt")
    import lstmopt.job.verification as verification

    real = verification.compare
    monkeypatch.setattr(verification, "compare", lambda name, e, a, atol, rtol: real(name, e, a + 1.0, atol, rtol))
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:build_forecaster",
                                           input_shape=(2, 10, 3)))
    assert report.status == "verification_failed" and report.exit_code == 5
    assert "differs from the original" in report.error and report.verification["ok"] is False
    assert not (tmp_path / "out.pt").exists() and report.output is None


def test_artifact_that_cannot_load_in_a_fresh_process_fails_verification(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local_models.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lstm = torch.nn.LSTM(3, 4)\n    def forward(self, x):\n        return self.lstm(x)[0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import local_models

    out = write_artifact(optimize(local_models.Net()), tmp_path / "m.pt", format="pickle", metadata={})
    sys.path.remove(str(tmp_path))  # the child no longer finds local_models
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(Exception, match="does not load and run in a fresh process: .*local_models"):
        verify_artifact(local_models.Net(), out, format="pickle", samples=[], lstm_names=["lstm"])


@needs_bf16
def test_bf16_job_reports_its_error_against_fp32(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_speech_encoder().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", dtype="bfloat16",
                                           factory="models:build_speech_encoder", input_shape=(2, 40, 40)))
    assert report.status == "ok", report.error
    v, measured = report.verification, report.low_precision
    assert (v["atol"], v["rtol"]) == (measured["atol"], 0.0) and 0 < v["max_abs_error"] <= v["atol"] < 2e-2
    assert all("changes numerics" in m["reason"] for m in report.modules if m["packed"])


def test_nothing_to_optimize_warns_or_fails_on_request(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 3)), "plain.pt")
    report = optimize_file(OptimizeOptions(input="plain.pt", output="out.pt", trust=True, input_shape=(2, 4, 3)))
    assert report.ok and "nothing was optimized" in report.warnings[0]
    report = optimize_file(OptimizeOptions(input="plain.pt", output="out2.pt", trust=True, require_lstm=True))
    assert report.status == "nothing_to_optimize" and report.exit_code == 4 and not (tmp_path / "out2.pt").exists()


def test_min_speedup_needs_inputs_and_is_enforced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(Encoder().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:Encoder",
                                           min_speedup=1.1))
    assert report.exit_code == 2 and "needs inputs to time" in report.error
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:Encoder",
                                           input_shape=(1, 4, 16), min_speedup=1000.0))
    assert report.status == "too_slow" and report.exit_code == 6 and "below the required 1000x" in report.error
    assert report.benchmark["cases"] and not (tmp_path / "out.pt").exists()


def test_reports_serialise_and_raise_for_status(tmp_path):
    report = optimize_file(OptimizeOptions(input=tmp_path / "absent.pt", output=tmp_path / "o.pt"))
    data = report.to_dict()
    assert data["schema"] == "lstmopt.report/1" and data["status"] == "error" and data["exit_code"] == 2
    with pytest.raises(Exception, match="no such file"):
        report.raise_for_status()
    assert isinstance(Verification(0, 0, []).to_dict(), dict)


def test_autotune_job_records_each_choice_and_verifies_at_the_matching_tolerance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_forecaster().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:build_forecaster",
                                           input_shape=(2, 16, 3), autotune=True, approx=True))
    assert report.status == "ok", report.error
    modules = {m["name"]: m for m in report.modules}
    # The encoder gets 16 steps a call, which the single-step cell kernel would hand to nn.LSTM.
    assert set(modules["encoder"]["autotune_ms"]) == {"onednn", "stock"} | APPROX_EXTRA
    assert set(modules["decoder"]["autotune_ms"]) == {"onednn", "cell", "stock"} | APPROX_EXTRA
    # LSTMs on the native kernel are named, with the line that loads it; verification loaded it too.
    on_native = [name for name, m in modules.items() if m["kernel"] == "native"]
    assert report.artifact["native_kernel"] == on_native
    assert any(native.LOAD_LINE in w for w in report.warnings) == bool(on_native)
    exact = all(m["exact"] for m in modules.values())
    assert (report.verification["atol"], report.verification["rtol"]) == ((0.0, 0.0) if exact else (1e-6, 1e-6))
    assert report.verification["criterion"] == ("tolerance" if exact else "float64")
    assert read_metadata(tmp_path / "out.pt")["modules"] == json.loads(json.dumps(report.modules))
    assert "autotune_s" in report.timings


def test_autotune_needs_inputs(tmp_path):
    report = optimize_file(OptimizeOptions(input=tmp_path / "m.pt", output=tmp_path / "o.pt", autotune=True))
    assert report.exit_code == 2 and "autotune needs inputs to time" in report.error


def _measured(monkeypatch, *cases):
    """Make ``--bench`` report these cases, as a loaded machine might measure them."""
    import lstmopt.job.benchmarking as benchmarking
    from lstmopt.job.benchmarking import Benchmark, LatencyCase

    monkeypatch.setattr(benchmarking, "compare_latency", lambda *args, **kwargs: Benchmark(
        rounds=9, threads=1, cases=[LatencyCase(f"case {i}", *case, 9) for i, case in enumerate(cases)],
        stable=all(high / low < 1.2 for _, _, low, high in cases)))


def test_a_benchmark_that_shows_the_artifact_slower_says_so_and_names_the_lstms(tmp_path, monkeypatch):
    from lstmopt.reporting.report import report_markdown

    monkeypatch.chdir(tmp_path)
    tagger_inputs(tmp_path / "inputs.pt")
    torch.save(build_tagger().state_dict(), "model.pt")
    # (original ms, optimized ms, speedup interval): one surely slower, one faster
    _measured(monkeypatch, (1.0, 2.0, 0.45, 0.55), (1.0, 0.9, 1.05, 1.2))
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:build_tagger",
                                           example_inputs="inputs.pt", benchmark=True))
    assert report.status == "ok" and report.exit_code == 0  # only --min-speedup changes the exit code
    (warning,) = [w for w in report.warnings if "slower" in w]
    assert warning.startswith("the artifact ran slower than the original on 1 of 2 inputs beyond the timing noise "
                              "(worst 0.50x, 95% interval 0.45-0.55x)")
    (lstm,) = report.benchmark["lstms"]
    assert lstm["name"] == "lstm" and lstm["inputs"] == "PackedSequences" and lstm["original_ms"] > 0
    assert warning in report_markdown(report.to_dict())


def test_numbers_the_noise_cannot_support_give_no_slower_verdict_and_never_fail_min_speedup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(Encoder().state_dict(), "model.pt")
    options = dict(input="model.pt", output="out.pt", factory="models:Encoder", input_shape=(1, 4, 16))
    # 964x and 0.13x, as a loaded CI runner measured them, with the spread those rounds really had
    _measured(monkeypatch, (964.0, 1.0, 0.4, 2000.0), (0.13, 1.0, 0.05, 1.6))
    report = optimize_file(OptimizeOptions(**options, min_speedup=1.1))
    assert report.ok and report.exit_code == 0 and (tmp_path / "out.pt").exists()
    assert not any("slower" in w for w in report.warnings)
    assert any("did not settle" in w for w in report.warnings)
    assert any("cannot tell whether it is below the required 1.1x" in w for w in report.warnings)
    assert report.benchmark["speedup_low"] < 1.1 < report.benchmark["speedup_high"]
    # A speedup whose whole interval lies below the minimum fails it.
    _measured(monkeypatch, (1.0, 1.0, 0.95, 1.04))
    report = optimize_file(OptimizeOptions(**dict(options, output="out2.pt"), min_speedup=1.1))
    assert report.exit_code == 6 and "95% interval 0.95-1.04x" in report.error and not (tmp_path / "out2.pt").exists()


def test_the_slower_warning_blames_lstms():
    from lstmopt.job.benchmarking import LatencyCase, LstmLatency
    from lstmopt.job.benchmarking import slower_warning
    from lstmopt.rewrite.swap import plan

    decisions = plan(build_tagger())
    text = slower_warning([LatencyCase("x", 1.0, 1.1, 0.85, 0.95, 9)], 4,
                           [LstmLatency("lstm", "PackedSequences", 1.0, 1.25)], decisions)
    assert "on 1 of 4 inputs beyond the timing noise (worst 0.91x, 95% interval 0.85-0.95x)" in text
    assert "lstm 0.80x on its PackedSequences: PackedSequences take nn.LSTM's own path" in text
    text = slower_warning([LatencyCase("x", 1.0, 1.5, 0.6, 0.7, 9)], 1, [LstmLatency("lstm", "tensors", 1.0, 0.9)],
                           decisions)
    assert "no LSTM is slower on its own (lstm 1.11x): the difference lies elsewhere" in text


def test_lazy_modules_the_model_code_leaves_in_sys_modules_are_never_imported(tmp_path, monkeypatch):
    # speechbrain registers lazy modules whose first attribute access imports an optional dependency.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lazy_factory.py").write_text(
        "import sys, types\nfrom models import Encoder\n\n"
        "class Lazy(types.ModuleType):\n    def __getattr__(self, name):\n"
        "        raise ImportError(f'Lazy import of {self.__name__} failed')\n\n"
        "sys.modules['optional_integration'] = Lazy('optional_integration')\n\n"
        "def build():\n    return Encoder()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # The factory puts the lazy module in sys.modules; this takes it out again when the test ends (later
    # tests walk sys.modules: hypothesis reads every module's __file__).
    monkeypatch.setitem(sys.modules, "optional_integration", None)
    monkeypatch.setitem(sys.modules, "lazy_factory", None)
    del sys.modules["lazy_factory"]
    torch.save(Encoder().state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="lazy_factory:build",
                                           input_shape=(1, 4, 16)))
    assert report.ok, report.error
    assert any(path.endswith("lazy_factory.py") for path in read_metadata(tmp_path / "out.pt")["user_code"])


def test_example_inputs_may_be_batch_dicts(tmp_path, monkeypatch):
    from models import BatchDictForecaster

    monkeypatch.chdir(tmp_path)
    torch.save(BatchDictForecaster().state_dict(), "model.pt")
    torch.save([({"insample_y": torch.randn(b, 12, 1), "hist_exog": torch.randn(b, 12, 2)},) for b in (1, 4)],
               "inputs.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:BatchDictForecaster",
                                           example_inputs="inputs.pt"))
    assert report.ok, report.error
    assert report.verification["max_abs_error"] == 0 and len(report.verification["model_outputs"]) == 2
    assert report.verification["samples"][0] == "{insample_y: (1, 12, 1), hist_exog: (1, 12, 2)}"


class _ByKeyword(torch.nn.Module):
    """Calls its LSTM with keyword arguments, as darts' models do (lstm(input=x, hx=h))."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(5, 8, batch_first=True)

    def forward(self, x):
        return self.lstm(input=x, hx=None)[0]


@pytest.mark.parametrize("scripted", [False, True])
def test_blaming_a_slower_lstm_times_calls_that_pass_the_input_by_keyword(scripted):
    from lstmopt import optimize
    from lstmopt.job.benchmarking import per_lstm_latency

    torch.manual_seed(0)
    original = _ByKeyword().eval()
    fast = optimize(original)
    target = torch.jit.script(fast) if scripted else fast
    (timed,) = per_lstm_latency(original, target, ["lstm"], [(torch.randn(2, 4, 5),)], rounds=3, round_s=0.001)
    assert timed.name == "lstm" and timed.inputs == "tensors" and timed.original_ms > 0 and timed.optimized_ms > 0
