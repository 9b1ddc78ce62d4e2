"""Facts about this machine and software that reports and artifact metadata record."""

from __future__ import annotations

import os
import platform
import warnings
from functools import lru_cache
from typing import Optional

import lstmopt


@lru_cache(maxsize=1)
def describe() -> dict:
    import torch

    return {
        "lstmopt": lstmopt.__version__,
        "torch": torch.__version__,
        "onednn": _onednn_version(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
    }


def _onednn_version() -> str:
    import torch

    config = torch.__config__.show()
    for line in config.splitlines():
        if "oneDNN" in line or "MKL-DNN" in line:
            for token in line.replace("(", " ").replace(")", " ").split():
                if token.startswith("v") and token[1:2].isdigit():
                    return token[1:]
    return "unknown"


def cpuinfo(field: str) -> Optional[str]:
    """The first ``field`` of /proc/cpuinfo (``model name``, ``flags``), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cache_root():
    """Where lstmopt keeps what it made on this machine (first-use builds, the record of outputs it wrote):
    ``$LSTMOPT_CACHE``, else ``~/.cache/lstmopt``."""
    from pathlib import Path

    return Path(os.environ.get("LSTMOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lstmopt"))


def hide_numpy_warning() -> None:
    """torch warns when it is imported without NumPy ("Failed to initialize NumPy"), which lstmopt never
    uses: keep that warning off the screens of lstmopt's commands (call before torch is imported)."""
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
