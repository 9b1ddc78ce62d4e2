"""Writing optimized models: TorchScript or pickle, atomically, with metadata readable without loading.

- TorchScript (``torch.jit.script``): loads with plain ``torch.jit.load`` where lstmopt is not installed;
  each ``PackedLayer`` stores dense weights and packs them again when loaded (packed layouts depend on the
  loading CPU).
- Pickle (``torch.save`` of the module): loads with lstmopt and the model's own classes importable, and
  repacks on load the same way.

Both are zip archives; the metadata is the record ``<archive>/extra/lstmopt.json`` (TorchScript's
``_extra_files``), so ``read_metadata`` never unpickles anything. Writes go to a temporary file in the
target directory that is renamed over the output only once complete.
"""

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .choices import FORMATS
from .errors import UsageError
from .files import atomic_path, check_output_path

__all__ = ["FORMATS", "METADATA_NAME", "read_metadata", "save_artifact", "script", "write_artifact"]

METADATA_NAME = "lstmopt.json"


def write_artifact(model, output: os.PathLike | str, *, format: str, metadata: dict, force: bool = False,
                   inputs: Tuple[Path, ...] = ()) -> Path:
    """Write the optimized ``model`` to ``output`` atomically (see ``save_artifact``)."""
    output = check_output_path(Path(output), force=force, inputs=inputs)
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    scripted = script(prepare_for_inference(model)) if format == "torchscript" else None
    with atomic_path(output) as tmp:
        save_artifact(scripted if scripted is not None else model, tmp, format=format, metadata=metadata)
    return output


def save_artifact(model, path: Path, *, format: str, metadata: dict) -> None:
    """Save ``model`` (an optimized model, or one already scripted) to ``path`` in ``format``
    ("torchscript" or "pickle"), with ``metadata`` as the ``lstmopt.json`` record."""
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    text = json.dumps(metadata, indent=2, sort_keys=True)
    if format == "torchscript":
        if not isinstance(model, torch.jit.ScriptModule):
            model = script(prepare_for_inference(model))
        torch.jit.save(model, str(path), _extra_files={METADATA_NAME: text})
    else:
        torch.save(prepare_for_inference(model), path)
        with zipfile.ZipFile(path, "a") as archive:
            prefix = archive.namelist()[0].split("/", 1)[0]
            archive.writestr(f"{prefix}/extra/{METADATA_NAME}", text)


def prepare_for_inference(model):
    """Eval mode. Parameters keep their requires_grad flags: freezing them would change the numerics of
    other layers (at::matmul folds batched inputs differently when a weight requires grad), so run the
    artifact under torch.inference_mode() or torch.no_grad(), as any inference."""
    return model.eval()


class LSTMEntry(nn.Module):
    """TorchScript cannot call a scripted nn.LSTM directly (its forward is overloaded), so a model that is
    a bare LSTM is scripted behind this Tensor-only entry point (its state_dict keys gain ``lstm.``)."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        return self.lstm(input, hx)


def script(model):
    """``torch.jit.script`` with an error that names the unscriptable part and suggests the pickle format."""

    if isinstance(model, nn.LSTM):
        model = LSTMEntry(model)
    try:
        return torch.jit.script(model)
    except Exception as exc:
        raise UsageError(f"the model's code is not scriptable: {_script_error(exc)}; "
                         "write it with --format pickle instead") from exc


def _script_error(exc: BaseException) -> str:
    """TorchScript's first line plus the culprit line it marks with ``<--- HERE``."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    headline = (lines[0] if lines else type(exc).__name__).rstrip(":")
    where = re.search(r'File "([^"]+)", line (\d+)', text)
    if where:
        snippet = text[where.end():].splitlines()[1:]
        marker = next((i for i, line in enumerate(snippet) if "<--- HERE" in line), None)
        if marker:
            culprit, number = snippet[marker - 1].strip(), int(where.group(2)) + marker - 1
        else:
            culprit, number = "", int(where.group(2))
        headline += f" (at {Path(where.group(1)).name}:{number}" + (f": {culprit}" if culprit else "") + ")"
    return headline if len(headline) <= 400 else headline[:397] + "..."


def read_metadata(path: os.PathLike | str) -> dict:
    """The metadata lstmopt stored in an artifact, read without loading the model."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_NAME}")]
            if not names:
                raise UsageError(f"{path} has no lstmopt metadata; it was not written by lstmopt")
            return json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"cannot read {path} as an lstmopt artifact ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} has corrupt lstmopt metadata ({exc})") from exc
