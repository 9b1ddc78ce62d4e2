"""The record of the outputs lstmopt wrote on this machine: what lets a batch skip an output as up to date.

An artifact's ``lstmopt.json`` says which input and options made it, but anyone can write that record: a
410-byte zip holding nothing but a forged one would pass for an up-to-date output. So when a job's output is
written and verified, lstmopt records its SHA-256 beside the input's and the options' in its own private
directory (``$LSTMOPT_CACHE/outputs``, this user's only, checked as the first-use build cache is): an output
is up to date only where that record matches the file as it is now (so it is complete, and lstmopt's). An
output made elsewhere, or before the record existed, is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from lstmopt.environment import cache_root

__all__ = ["proves", "record"]


def _entry(output: Path) -> Path:
    key = hashlib.sha256(os.path.realpath(output).encode()).hexdigest()
    return cache_root() / "outputs" / f"{key}.json"


def record(output: Path, *, sha256: str, source_sha256: Optional[str], options_sha256: str) -> None:
    """Note that lstmopt wrote ``output`` (whose bytes hash to ``sha256``) from that input with those options.
    Best effort: where the private directory cannot be made safely, nothing is recorded (the output is redone
    next time, never wrongly skipped)."""
    from lstmopt.kernels.build_cache import InsecureCacheError, private_dir

    entry = _entry(output)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    try:
        private_dir(entry.parent, "lstmopt's record of its outputs")
        tmp.write_text(json.dumps({"output": os.path.realpath(output), "sha256": sha256,
                                   "source_sha256": source_sha256, "options_sha256": options_sha256}))
        os.replace(tmp, entry)
    except (OSError, InsecureCacheError):
        with contextlib.suppress(OSError):
            tmp.unlink()


def proves(output: Path, *, sha256: str, source_sha256: str, options_sha256: str) -> bool:
    """Whether lstmopt's record says it wrote ``output`` as it is now (``sha256``), from that input and with
    those options."""
    entry = _entry(output)
    try:
        info = os.lstat(entry)
        if info.st_uid != os.getuid() or info.st_mode & 0o022 or not entry.is_file():
            return False
        recorded = json.loads(entry.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(recorded, dict) and recorded.get("sha256") == sha256
            and recorded.get("source_sha256") == source_sha256 and recorded.get("options_sha256") == options_sha256)
