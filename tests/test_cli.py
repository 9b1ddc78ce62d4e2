"""The lstmopt command line, in process (typer's CliRunner) and as the installed console script."""

import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import torch

from conftest import ROOT, invoke
from lstmopt import native
from lstmopt.reporting.report import schema
from models import build_tagger




@pytest.fixture
def work(tmp_path, monkeypatch):
    """A directory holding a tagger state dict, a pickled tagger and example inputs."""
    monkeypatch.chdir(tmp_path)
    model = build_tagger()
    torch.save(model.state_dict(), "tagger.pt")
    torch.save(model, "tagger_full.pt")
    g = torch.Generator().manual_seed(0)
    torch.save([(torch.randint(0, 50, (b, t), generator=g), torch.randint(1, t + 1, (b,), generator=g))
                for b, t in [(1, 4), (3, 9)]], "inputs.pt")
    return tmp_path


OPTIMIZE = ["optimize", "tagger.pt", "-o", "out.pt", "--factory", "models:build_tagger", "--example-inputs", "inputs.pt"]


def test_optimize_writes_a_verified_artifact_a_schema_valid_report_and_a_summary(work):
    result = invoke(*OPTIMIZE, "--report", "report.json", "--summary", "summary.md", "--bench")
    assert result.exit_code == 0, result.output
    assert "lstm" in result.stdout and "packed float32" in result.stdout and "passed" in result.stdout
    assert "wrote out.pt" in result.stdout
    report = json.loads((work / "report.json").read_text())
    jsonschema.validate(report, schema())
    assert report["status"] == "ok" and report["output"]["path"] == "out.pt" and report["benchmark"]["cases"]
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cpu_isa"]
    summary = (work / "summary.md").read_text()
    assert summary.startswith("## ✅ lstmopt: `tagger.pt` — ok")
    assert "| `lstm` | 24 | 20 | 2 | bi | packed (float32) |" in summary and "**Speedup**" in summary


def test_json_mode_prints_only_the_report(work):
    result = invoke(*OPTIMIZE, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    jsonschema.validate(report, schema())
    assert report["verification"]["ok"] and report["modules"][0]["name"] == "lstm"


def test_json_mode_keeps_what_the_model_code_prints_off_stdout(work):
    # flair logs to stdout when it is imported and when a tagger is built
    (work / "chatty.py").write_text(
        "import logging, sys\nfrom models import build_tagger\n"
        "log = logging.getLogger('chatty')\nlog.addHandler(logging.StreamHandler(sys.stdout))\n"
        "log.setLevel(logging.INFO)\n\ndef build():\n    print('building the tagger')\n"
        "    log.info('vocabulary size of 50')\n    return build_tagger()\n")
    sys.path.insert(0, str(work))
    try:
        result = invoke("optimize", "tagger.pt", "-o", "out.pt", "--factory", "chatty:build", "--example-inputs",
                        "inputs.pt", "--json")
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("chatty", None)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ok"
    assert "building the tagger" in result.stderr and "vocabulary size of 50" in result.stderr


def test_quiet_mode_prints_nothing_on_success(work):
    result = invoke(*OPTIMIZE, "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and (work / "out.pt").exists()


@pytest.mark.parametrize("args, code, message", [
    (["optimize", "absent.pt", "-o", "o.pt"], 2, "absent.pt: no such file"),
    (["optimize", "tagger.pt", "-o", "o.pt"], 2, "pass --factory package.module:callable"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--factory-kwargs", "{bad"], 2,
     "--factory-kwargs is not valid JSON"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--format", "onnx"], 2, "Invalid value for '--format'"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--input-shape", "1,2"], 2, "--input-shape must be three"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--report", "no/dir/r.json"], 2,
     "no/dir does not exist"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--report", "tagger.pt/r.json"], 2,
     "tagger.pt does not exist or is not a directory"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--report", "tagger.pt"], 2,
     "the report tagger.pt is the input tagger.pt; lstmopt never writes a file it reads"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--summary", "./inputs.pt",
      "--example-inputs", "inputs.pt"], 2, "the summary inputs.pt is the example inputs inputs.pt"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--report", "o.pt"], 2,
     "the report o.pt and the output o.pt are the same file"),
    (["optimize", "tagger.pt", "-o", "inputs.pt", "--factory", "models:build_tagger", "--example-inputs", "inputs.pt",
      "--force"], 2, "the output inputs.pt is the example inputs inputs.pt"),
    (["optimize", "tagger.pt", "-o", "o.pt", "--factory", "models:build_tagger", "--input-shape", "100000,100000,100000"],
     2, "--input-shape 100000,100000,100000 asks for inputs of 1e+15 values"),
    (["optimize", "tagger_full.pt", "-o", "o.pt"], 3, "is a pickled module (a models.Tagger object): loading it runs code"),
    (["optimize", "tagger.pt", "-o", "tagger.pt", "--factory", "models:build_tagger", "--force"], 2,
     "the output tagger.pt is the input tagger.pt"),
    (["frobnicate"], 2, "No such command 'frobnicate'"),
])
def test_errors_are_one_line_with_a_documented_exit_code(work, args, code, message):
    before = (work / "tagger.pt").read_bytes()
    result = invoke(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert (work / "tagger.pt").read_bytes() == before
    assert not (work / "o.pt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["inputs.pt", "tagger.pt", "tagger_full.pt"]


@pytest.fixture
def read_only_dir(work):
    """A directory nobody can create files in: mode 0555, and immutable where root runs the tests (root
    ignores modes; chattr +i binds it too)."""
    path = work / "ro"
    path.mkdir()
    path.chmod(0o555)
    immutable = os.getuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and this file system has no immutable flag")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_a_read_only_report_directory_fails_before_any_work(work, read_only_dir):
    result = invoke(*OPTIMIZE, "--report", "ro/r.json")
    assert result.exit_code == 2 and "cannot write the report ro/r.json" in result.stderr
    assert not (work / "out.pt").exists()


def test_the_report_is_written_when_the_artifact_does_not_fit_on_the_disk(work):
    # RLIMIT_FSIZE stands in for a full disk: a write past it fails (EFBIG) as one past a full disk does
    # (ENOSPC), where torch.jit.save to a path would abort the process.
    torch.save(build_tagger(hidden=256).state_dict(), "big.pt")  # a 4 MB artifact
    args = ["optimize", "big.pt", "-o", "out.pt", "--factory", "models:build_tagger", "--factory-kwargs",
            '{"hidden": 256}', "--report", "r.json", "--quiet"]
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        from lstmopt.cli.app import main
        sys.exit(main({args!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == "error: cannot write out.pt: File too large (8.7 MB needed)", line
    report = json.loads((work / "r.json").read_text())
    assert report["status"] == "error" and report["exit_code"] == 2
    assert sorted(p.name for p in work.iterdir()) == ["big.pt", "inputs.pt", "r.json", "tagger.pt", "tagger_full.pt"]


def test_debug_shows_the_traceback(work):
    result = invoke("optimize", "tagger_full.pt", "-o", "o.pt", "--debug")
    assert result.exit_code == 3 and "Traceback" in result.stderr and "UntrustedPickleError" in result.stderr


def test_an_internal_error_is_one_line_with_exit_1_and_a_traceback_only_with_debug(work, monkeypatch):
    import lstmopt.job.pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lstmopt.job.pipeline, "optimize_file", broken)
    result = invoke(*OPTIMIZE)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: internal error: ZeroDivisionError: a bug "
                                     "(re-run with --debug for the traceback)")
    result = invoke(*OPTIMIZE, "--debug")
    assert result.exit_code == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_an_internal_error_deep_in_a_job_still_writes_the_report(work, monkeypatch):
    import lstmopt.rewrite.swap

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lstmopt.rewrite.swap, "plan", broken)
    result = invoke(*OPTIMIZE, "--report", "r.json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: internal error: ZeroDivisionError: a bug "
                                     "(re-run with --debug for the traceback)")
    report = json.loads(Path("r.json").read_text())
    assert (report["status"], report["exit_code"]) == ("error", 1)
    assert report["error"] == "internal error: ZeroDivisionError: a bug"


def test_trusted_pickle_is_optimized(work):
    result = invoke("optimize", "tagger_full.pt", "-o", "o.pt", "--trust", "--example-inputs", "inputs.pt",
                    "--format", "pickle", "--quiet")
    assert result.exit_code == 0, result.stderr


def test_nothing_to_optimize_warns_or_exits_4(work):
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), "plain.pt")
    result = invoke("optimize", "plain.pt", "-o", "o.pt", "--trust", "--input-shape", "2,3,4")
    assert result.exit_code == 0 and "nothing was optimized" in result.stderr
    result = invoke("optimize", "plain.pt", "-o", "o2.pt", "--trust", "--require-lstm", "--report", "r.json")
    assert result.exit_code == 4 and "nothing to optimize" in result.stderr
    report = json.loads((work / "r.json").read_text())
    jsonschema.validate(report, schema())
    assert report["status"] == "nothing_to_optimize" and report["exit_code"] == 4 and report["output"] is None


def test_verification_failure_exits_5_and_reports_the_errors(work):
    # Deterministic, but its output depends on the class of its LSTM, which the artifact changes.
    (work / "noisy.py").write_text(
        "import torch\n"
        "class Noisy(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.lstm = torch.nn.LSTM(4, 8)\n"
        "    def forward(self, x):\n"
        "        return self.lstm(x)[0] + (0.0 if type(self.lstm).__name__ == 'LSTM' else 1e-3)\n")
    sys.path.insert(0, str(work))
    try:
        import noisy

        torch.save(noisy.Noisy().state_dict(), "noisy.pt")
    finally:
        sys.path.remove(str(work))
    result = invoke("optimize", "noisy.pt", "-o", "o.pt", "--factory", "noisy:Noisy", "--input-shape", "2,5,4",
                    "--report", "r.json", "--summary", "s.md")
    assert result.exit_code == 5, result.output
    assert "differs from the original" in result.stderr and "failed" in result.stdout
    report = json.loads((work / "r.json").read_text())
    jsonschema.validate(report, schema())
    assert report["status"] == "verification_failed" and report["verification"]["max_abs_error"] > 0
    assert not (work / "o.pt").exists()
    assert "**Verification** **failed**" in (work / "s.md").read_text()


def test_speedup_below_the_minimum_exits_6(work):
    result = invoke(*OPTIMIZE, "--min-speedup", "1000", "--json")
    assert result.exit_code == 6
    report = json.loads(result.stdout)
    assert report["status"] == "too_slow" and report["benchmark"]["speedup"] < 1000


def test_autotune_shows_and_reports_the_kernel_each_lstm_got(work):
    result = invoke(*OPTIMIZE, "--autotune", "--approx", "--report", "r.json")
    assert result.exit_code == 0, result.output
    (lstm,) = json.loads((work / "r.json").read_text())["modules"]
    # The tagger gives its LSTM PackedSequences only: their kernel is chosen, the one for tensors is kept.
    assert lstm["kernel"] == "onednn" and lstm["autotune_ms"] is None
    timed = {"stock", "onednn"} | ({"native"} if native.available() else set())
    assert lstm["sequence_kernel"] in timed and set(lstm["sequence_autotune_ms"]) == timed
    assert f"sequences: {lstm['sequence_kernel']}" in result.stdout or lstm["sequence_kernel"] == "stock"
    # Without autotune, --approx leaves an nn.LSTM (which has an exact kernel) on its default kernel.
    assert invoke(*OPTIMIZE, "-o", "o2.pt", "--approx", "--report", "r2.json").exit_code == 0
    (lstm,) = json.loads((work / "r2.json").read_text())["modules"]
    assert lstm["kernel"] == "onednn" and lstm["sequence_kernel"] == "stock" and lstm["exact"]


def test_existing_output_needs_force(work):
    assert invoke(*OPTIMIZE, "--quiet").exit_code == 0
    result = invoke(*OPTIMIZE, "--quiet")
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert invoke(*OPTIMIZE, "--quiet", "--force").exit_code == 0


def test_inspect_shows_the_tree_and_decisions(work):
    torch.save(torch.nn.ModuleDict({"enc": torch.nn.LSTM(4, 8), "proj": torch.nn.LSTM(4, 8, proj_size=2)}), "m.pt")
    result = invoke("inspect", "m.pt", "--trust")
    assert result.exit_code == 0, result.output
    assert "enc: LSTM" in result.stdout and "proj_size>0 has no exact kernel" in result.stdout
    assert "1 of 2 recurrent modules can be packed" in result.stdout
    data = json.loads(invoke("inspect", "tagger.pt", "--factory", "models:build_tagger", "--json").stdout)
    (lstm,) = data["modules"]
    assert lstm["name"] == "lstm" and lstm["packed"] and lstm["parameters"] == data["lstm_parameters"] > 0
    assert not (work / "m.pt.opt").exists() and sorted(p.name for p in work.iterdir()) == sorted(
        ["tagger.pt", "tagger_full.pt", "inputs.pt", "m.pt"])


def test_verify_passes_for_the_source_and_exits_5_for_another_model(work):
    assert invoke(*OPTIMIZE, "--quiet").exit_code == 0
    result = invoke("verify", "tagger.pt", "out.pt", "--factory", "models:build_tagger",
                    "--example-inputs", "inputs.pt", "--trust")
    assert result.exit_code == 0 and "passed" in result.stdout
    torch.manual_seed(5)
    from models import Tagger
    torch.save(Tagger().state_dict(), "other.pt")
    result = invoke("verify", "other.pt", "out.pt", "--factory", "models:Tagger", "--example-inputs", "inputs.pt",
                    "--trust", "--json")
    assert result.exit_code == 5 and "made from a different file" in result.stderr
    assert json.loads(result.stdout)["ok"] is False


def test_bench_prints_a_table_and_draws_a_plot(work):
    result = invoke("bench", "tagger.pt", "--factory", "models:build_tagger", "--example-inputs", "inputs.pt",
                    "--rounds", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["cases"]) == 2 and data["speedup"] > 0
    torch.save(torch.nn.LSTM(8, 16, batch_first=True), "lstm.pt")
    result = invoke("bench", "lstm.pt", "--trust", "--input-shape", "4,32,8", "--rounds", "3",
                    "--plot", "latency.png")
    assert result.exit_code == 0, result.output
    assert "speedup" in result.stdout and (work / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert invoke("bench", "lstm.pt", "--trust").exit_code == 2


class _Payload:
    """What a forged artifact's data.pkl holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_verify_refuses_to_unpickle_an_artifact_without_trust_whatever_its_metadata_says(work):
    import pickle
    import zipfile

    assert invoke(*OPTIMIZE[:3], "real.pt", *OPTIMIZE[4:], "--format", "pickle", "--quiet").exit_code == 0
    marker = work / "pwned"
    with zipfile.ZipFile("real.pt") as real, zipfile.ZipFile("forged.pt", "w") as forged:
        for item in real.infolist():  # the lstmopt.json record stays: anyone can write it
            data = real.read(item)
            forged.writestr(item, pickle.dumps(_Payload(marker), protocol=2) if item.filename.endswith("/data.pkl")
                            else data)
    result = invoke("verify", "tagger.pt", "forged.pt", "--factory", "models:build_tagger",
                    "--example-inputs", "inputs.pt")
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "forged.pt is a pickled module" in line and "--trust" in line
    assert not marker.exists()
    # The real pickle artifact verifies once trusted.
    assert invoke("verify", "tagger.pt", "real.pt", "--factory", "models:build_tagger", "--example-inputs",
                  "inputs.pt", "--trust").exit_code == 0
