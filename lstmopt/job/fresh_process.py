"""The parent's side of the fresh-process check: what the child is given (inputs, settings, import paths, the
native library), its launch in an isolated interpreter, and what its failure means (``verify_child`` is the
child; ``verification`` compares what it returns)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from lstmopt.artifacts.files import private_temp_dir, write_bytes
from lstmopt.artifacts.scripting import torchscript_gone
from lstmopt.errors import UsageError, VerificationError, one_line
from lstmopt.job import verify_child
from lstmopt.job.children import in_installation, isolated_python, preexec
from lstmopt.job.samples import only_tensors

__all__ = ["native_library", "run_child"]


def _user_paths() -> list[str]:
    """The current directory and the import paths added to this interpreter beyond its installation."""
    paths = [os.getcwd()]
    for entry in sys.path:
        entry = os.path.abspath(entry or ".")
        if entry not in paths and not in_installation(entry) and os.path.isdir(entry):
            paths.append(entry)
    return paths


def native_library() -> str:
    from lstmopt.kernels import native

    if not native.load(quiet=True):
        raise UsageError("the artifact runs lstmopt's native kernel, which cannot be built here "
                         f"({native.unavailable_reason()})")
    return native.library_path()


def run_child(artifact: Path, format: str, samples: list, lstm_payload: list, numerics: dict,
               native_library: Optional[str], seed: Optional[int], timeout: float, expected_modules: list,
               pytree_types: list) -> dict:
    with private_temp_dir("lstmopt-verify-") as tmp:
        payload, samples_file, result = tmp / "payload.pt", tmp / "samples.pt", tmp / "result.pt"
        objects = not all(only_tensors(sample) for sample in samples)
        # A pickle artifact's classes are the user's, as are those of inputs or outputs that hold objects: the
        # child imports them from where this process did.
        user_classes = format == "pickle" or objects or bool(pytree_types)
        for path, content in ((payload, {"lstms": lstm_payload, "numerics": numerics, "native_library": native_library,
                                         "seed": seed, "import_paths": _user_paths() if user_classes else [],
                                         "samples_hold_objects": objects, "expected_modules": expected_modules,
                                         "pytree_types": pytree_types}),
                              (samples_file, samples)):
            buffer = io.BytesIO()
            torch.save(content, buffer)
            try:
                write_bytes(path, buffer.getbuffer())
            except OSError as exc:
                raise UsageError(f"cannot write the verification inputs to {tmp}: {exc.strerror}") from exc
        try:
            proc = subprocess.run(
                isolated_python(verify_child.__file__, str(artifact), format, str(payload), str(samples_file),
                                str(result)),
                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=preexec(),
            )
        except subprocess.TimeoutExpired as exc:
            raise VerificationError(f"reloading the artifact in a fresh process took over {timeout:.0f} s") from exc
        if proc.returncode != 0 or not result.exists():
            for what, path in (("temporary directory", tmp), ("artifact", artifact)):
                if not path.exists():
                    raise UsageError(f"lstmopt's {what} {path} was removed while the artifact was being verified "
                                     "(by another process, or a cleaner of temporary files); run again")
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            last = one_line(lines[-1]) if lines else f"exit status {proc.returncode}"
            if format == "torchscript" and torchscript_gone(last):
                raise UsageError(f"this torch cannot load TorchScript ({last}): the artifact needs a torch that "
                                 "still has it; write --format pt2 or aoti")
            raise VerificationError(f"the artifact does not load and run in a fresh process: {last}")
        return torch.load(result, weights_only=True)
