"""What the user sees of the command line: help and version, colour, signals, the demo, table layout."""

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import pytest
from rich.console import Console

from conftest import ROOT, SCRIPT, invoke, run_python, started
from lstmopt.reporting.display import modules_table
from models import build_speech_encoder, build_tagger

ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*(3[0-9]|9[0-7]|38;)[0-9;]*m")


def test_every_command_has_help_with_an_example():
    for command in ("optimize", "inspect", "verify", "bench", "demo", "batch", "merge-reports"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout and "--json" in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip().startswith("lstmopt 0.")


def test_help_is_fast_because_torch_is_not_imported():
    proc = run_python("import sys\nfrom lstmopt.cli import main\ncode = main(['--help'])\n"
                      "print(code, 'torch' in sys.modules)")
    assert proc.stdout.strip().splitlines()[-1] == "0 False"
    start = time.perf_counter()
    subprocess.run([SCRIPT, "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 5  # generous: the machine is shared; torch alone takes longer


def _colour_run(env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env.update({"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "120", **env_extra})
    return subprocess.run([SCRIPT, "inspect", "m.pt", "--trust"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_no_color_is_honoured(tmp_path):
    torch.save(torch.nn.ModuleDict({"a": torch.nn.LSTM(4, 8), "b": torch.nn.LSTM(4, 8, proj_size=2)}),
               tmp_path / "m.pt")
    coloured = _colour_run({}, tmp_path)
    plain = _colour_run({"NO_COLOR": "1"}, tmp_path)
    assert coloured.returncode == plain.returncode == 0
    assert ANSI_COLOR.search(coloured.stdout)  # the control: colour is on without NO_COLOR
    assert not ANSI_COLOR.search(plain.stdout) and "packed float32" in plain.stdout


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_leaves_no_partial_output(tmp_path, sig, code):
    torch.save(build_tagger().state_dict(), tmp_path / "tagger.pt")
    g = torch.Generator().manual_seed(0)
    torch.save([(torch.randint(0, 50, (8, 200), generator=g), torch.full((8,), 200))], tmp_path / "inputs.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    with started([SCRIPT, "optimize", "tagger.pt", "-o", "out.pt", "--factory", "models:build_tagger",
                  "--example-inputs", "inputs.pt", "--bench"],
                 cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 120
        while time.time() < deadline and not any(p.name.startswith(".out.pt") for p in tmp_path.iterdir()):
            time.sleep(0.05)  # wait until the artifact is being written or verified
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "no partial output" in stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.pt", "tagger.pt"]


def test_the_demo_shows_the_exact_approximate_and_int8_results_side_by_side_in_about_a_minute(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([SCRIPT, "demo", "--output-dir", str(tmp_path / "demo")], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("│")}
    assert set(rows) == {"default", "--autotune --approx", "--dtype int8"}
    assert "0 (bit-identical)" in rows["default"] and "onednn float32" in rows["default"]
    assert "native float32" in rows["--autotune --approx"] and "native int8" in rows["--dtype int8"]
    assert all("passed" in row and row.count("x ") >= 2 for row in rows.values())  # a speedup per input
    assert {p.name for p in (tmp_path / "demo").iterdir()} == {
        "keyword_spotter.pt", "keyword_spotter.torchscript.pt", "keyword_spotter.approx.torchscript.pt",
        "keyword_spotter.int8.torchscript.pt", "report.json", "report.approx.json", "report.int8.json", "summary.md"}
    assert elapsed < 150  # three verified, timed runs; README: "in about a minute"


def test_the_demo_never_writes_through_a_symlink_in_its_output_directory(tmp_path):
    precious = tmp_path / "precious.pt"
    precious.write_bytes(b"the user's own file")
    (tmp_path / "demo").mkdir()
    for name in ("keyword_spotter.pt", "report.json"):
        (tmp_path / "demo" / name).symlink_to(precious)
    result = invoke("demo", "--output-dir", tmp_path / "demo", "--quiet")
    assert result.exit_code == 0, result.output
    assert precious.read_bytes() == b"the user's own file"
    assert not any(p.is_symlink() for p in (tmp_path / "demo").iterdir())


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "lstmopt", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("lstmopt ")


def test_the_demo_screen_is_clean_on_a_machine_without_numpy(tmp_path):
    # torch warns at import when NumPy is missing, as on a fresh venv; lstmopt never uses NumPy.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([SCRIPT, "demo", "--output-dir", str(tmp_path / "demo")], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The one warning a run may give is lstmopt's own on a busy machine (CI's two suites share its cores).
    noise = [line for line in proc.stderr.splitlines() if "timings did not settle" not in line]
    assert noise == [] and "Warning" not in proc.stdout


LONG = {"name": "encoder.layers.0.recurrent_lstm", "aliases": [], "input_size": 128, "hidden_size": 256,
        "num_layers": 2, "bidirectional": True, "batch_first": True, "dtype": "float32", "packed": True,
        "packed_dtype": "bfloat16", "exact": False, "kernel": "onednn",
        "reason": "changes numerics: float32 inputs are cast to bfloat16 and results cast back"}


def _words(text):
    return set(re.split(r"[\s│┃]+", text))


TUNED = dict(LONG, packed_dtype="float32", kernel="native", sequence_kernel="native",
             reason="autotune: native kernel measured 2.1x, within 1e-6 of nn.LSTM, not bit-identical")


@pytest.mark.parametrize("width", [60, 80, 100, 120, 160])
@pytest.mark.parametrize("first", [LONG, TUNED], ids=["bf16", "native"])
def test_the_lstms_table_never_breaks_a_name_or_a_word_of_the_reason(width, first):
    buffer = io.StringIO()
    Console(file=buffer, width=width).print(modules_table([first, dict(LONG, name="dec", reason="kept: proj_size>0 "
                                                                                "has no exact kernel (oneDNN)")]))
    words = _words(buffer.getvalue())
    assert any(LONG["name"] in line for line in buffer.getvalue().splitlines())
    assert set(first["reason"].split()) <= words and {"proj_size>0", "exact", "(oneDNN)"} <= words
    assert max(len(line) for line in buffer.getvalue().splitlines()) <= width


def test_tables_in_a_ci_log_keep_each_lstm_on_one_line(tmp_path):
    torch.save(build_speech_encoder().state_dict(), tmp_path / "encoder.pt")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a CI log: not a terminal, no width
    env["PYTHONPATH"] = str(ROOT / "tests")
    proc = subprocess.run([SCRIPT, "optimize", "encoder.pt", "-o", "out.pt", "--factory", "models:build_speech_encoder"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("│ encoder │")]
    assert "bit-identical to eager" in row and "packed float32" in row


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its parent's wait is left


def test_a_process_a_test_starts_is_ended_with_what_it_started_when_the_test_fails():
    # A test that fails mid-way must not leave a batch and its workers running (spinning) for the rest of the suite
    code = ("import subprocess, sys, time\n"
            "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print(worker.pid, flush=True)\ntime.sleep(600)\n")
    with pytest.raises(RuntimeError):
        with started([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
            worker = int(proc.stdout.readline())
            assert _alive(worker)
            raise RuntimeError("the test failed here")
    deadline = time.time() + 30
    while time.time() < deadline and _alive(worker):
        time.sleep(0.05)
    assert proc.returncode is not None and not _alive(worker)


def test_a_process_a_test_starts_takes_ctrl_c_even_in_a_suite_launched_in_the_background():
    # `pytest &` in a non-interactive shell ignores SIGINT, and children inherit that
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with started([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is "
                      "signal.default_int_handler)"], stdout=subprocess.PIPE, text=True) as proc:
            out = proc.communicate(timeout=60)[0]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.strip() == "True"
