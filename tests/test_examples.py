"""Every example script runs as a user would run it, and writes what it promises."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "common.py")
PRODUCES = {
    "speech_encoder.py": ["speech_encoder.pt", "speech_encoder.opt.pt"],
    "tagger.py": ["tagger.pt", "tagger_inputs.pt", "tagger.opt.pt", "tagger.approx.pt"],
    "forecaster.py": ["forecaster.pt", "forecaster.opt.pt"],
    "streaming.py": ["streaming.pt", "streaming.opt.pt"],
    "save_models.py": ["speech_encoder.pt", "tagger.pt", "forecaster.pt", "streaming.pt", "tagger_inputs.pt"],
}


def test_every_script_is_covered():
    assert set(SCRIPTS) == set(PRODUCES)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(tmp_path, script):
    env = dict(os.environ, COLUMNS="120", PYTHONWARNINGS="ignore")
    env.pop("MODELS_DIR", None)
    args = ["--chunks", "40"] if script == "streaming.py" else []
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out-dir", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert set(PRODUCES[script]) <= {p.name for p in tmp_path.iterdir()}
    if script == "streaming.py":
        assert "every chunk's output identical" in proc.stdout
        # the measured ratio, whatever it is on this machine (speed is the benchmark's business)
        assert re.search(r"nn.LSTM \d+\.\d+ ms, lstmopt \d+\.\d+ ms -> \d+\.\d+x nn.LSTM's speed", proc.stdout)
    elif script != "save_models.py":
        assert "passed" in proc.stdout and "wrote" in proc.stdout
