"""Shared by the example scripts: where they keep files, and running the lstmopt CLI as a user would."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("MODELS_DIR", HERE / "models")),
                        help="where to save the model, its inputs and the optimized artifact "
                             "(default: $MODELS_DIR or examples/models)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return args


def lstmopt(*args: str) -> None:
    """Run ``lstmopt ARGS`` with this directory importable (the factories live here); stop on failure."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "lstmopt", *map(str, args)]
    print("$ lstmopt " + " ".join(map(str, args)), flush=True)
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        sys.exit(code)
