"""Writing optimized models: TorchScript or pickle, atomically, with metadata readable without loading.

- TorchScript: loads with plain ``torch.jit.load`` where lstmopt is not installed; the LSTMs' packs store
  dense weights and pack them again when loaded (packed layouts depend on the loading CPU). The model is
  scripted, or, when its code is not scriptable, traced with every LSTM scripted (``lstmopt.artifacts.tracing``).
- Pickle (``torch.save`` of the module): loads with lstmopt and the model's own classes importable, and
  repacks on load the same way.
- pt2 (``torch.export.save`` of a program exported on ``samples[0]``, ``lstmopt.artifacts.program``): loads
  with ``torch.export.load`` after ``import lstmopt`` or ``torch.ops.load_library`` of lstmopt's library;
  the ops pack the program's dense weights on their first call.
- aoti (AOTInductor's package of that program, ``torch._inductor.aoti_compile_and_package``): compiled C++
  (for the instruction set of the machine that compiles it), no Python on its calls; loads with
  ``torch._inductor.aoti_load_package`` (or C++'s ``AOTIModelPackageLoader``) after the same line.

An LSTM that autotune switched to the native kernel (``exact=False``) makes a TorchScript archive need
lstmopt's native library registered before ``torch.jit.load`` (``lstmopt.native.LOAD_LINE``); the
metadata and the returned record name those LSTMs (``native_kernel``).

All are zip archives; the metadata is the record ``<archive>/extra/lstmopt.json`` (TorchScript's
``_extra_files``, torch.export's ``extra_files``), so ``read_metadata`` never unpickles anything (see ``lstmopt.artifacts.metadata``). An artifact is
serialized in memory and then written by Python to a temporary file in the target directory, renamed over
the output only once complete: a full disk is a one-line error (``torch.jit.save`` to a path aborts the
process when a write fails).
"""

import contextlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lstmopt.choices import FORMATS
from lstmopt.errors import UsageError
from lstmopt.artifacts.files import atomic_path, check_output_path, write_bytes
from lstmopt.artifacts.metadata import METADATA_NAME, read_metadata
from lstmopt.modules.packs import tracked_copy

__all__ = ["FORMATS", "METADATA_NAME", "native_lstms", "read_metadata", "save_artifact", "script", "to_torchscript",
           "write_artifact"]

def write_artifact(model, output: os.PathLike | str, *, format: str, metadata: dict, force: bool = False,
                   inputs: Tuple[Path, ...] = (), samples: Sequence[tuple] = ()) -> Path:
    """Write the optimized ``model`` to ``output`` atomically (see ``save_artifact``).

    Example:
        >>> write_artifact(lstmopt.optimize(model), "model.ts.pt", format="torchscript", metadata={},
        ...                samples=[(torch.randn(1, 50, 40),)])
    """
    output = check_output_path(Path(output), force=force, inputs=inputs)
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    with atomic_path(output) as tmp:
        save_artifact(model, tmp, format=format, metadata=metadata, samples=samples)
    return output


def save_artifact(model, path: Path, *, format: str, metadata: dict, samples: Sequence[tuple] = ()) -> dict:
    """Save the optimized ``model`` to ``path`` in ``format`` ("torchscript", "pickle" or "pt2"), with
    ``metadata`` as the ``lstmopt.json`` record. TorchScript scripts the model, or traces it on ``samples[0]``
    when its code is not scriptable; pt2 exports it on ``samples[0]``. Returns how the artifact was made,
    ``{"method", "reason", "native_kernel"}`` (the LSTMs that run lstmopt's native kernel; for pt2 also
    ``lstmopt_ops``, whether loading needs lstmopt's library, and ``dynamic_dims``), which the metadata
    records too."""
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    metadata = {**metadata, "native_kernel": native_lstms(model)}
    buffer = io.BytesIO()
    if format == "torchscript":
        scripted, how = to_torchscript(model, samples)
        ops = set(how.get("lstms_traced_as_ops", ()))
        # What the archive runs: an LSTM a trace recorded as nn.LSTM's op uses none of its kernels.
        metadata["native_kernel"] = [name for name in metadata["native_kernel"] if name not in ops]
        if ops and "modules" in metadata:
            metadata["modules"] = [dict(m, **TRACED_AS_OP) if m.get("name") in ops else m for m in metadata["modules"]]
        how["native_kernel"] = metadata["native_kernel"]
        metadata = {**metadata, "torchscript": how}
        torch.jit.save(scripted, buffer, _extra_files={METADATA_NAME: _json(metadata)})
    elif format in ("pt2", "aoti"):
        how = _export(model, samples, metadata, buffer, compiled=format == "aoti")
    else:
        _pickle(prepare_for_inference(model), buffer)
        with zipfile.ZipFile(buffer, "a") as archive:
            prefix = archive.namelist()[0].split("/", 1)[0]
            archive.writestr(f"{prefix}/extra/{METADATA_NAME}", _json(metadata))
        how = {"method": "pickled", "reason": "--format pickle", "native_kernel": metadata["native_kernel"]}
    write_bytes(path, buffer.getbuffer())
    return how


def _export(model, samples: Sequence[tuple], metadata: dict, buffer, *, compiled: bool) -> dict:
    from lstmopt.artifacts.program import calls_lstmopt_ops, dynamic_dims, export_program

    flag = "--format aoti" if compiled else "--format pt2"
    if not samples:
        raise UsageError(f"{flag} exports the model on an example input: give --example-inputs or --input-shape")
    program = export_program(prepare_for_inference(model), samples[0])
    how = {"method": "compiled" if compiled else "exported", "reason": flag, "native_kernel": metadata["native_kernel"],
           "lstmopt_ops": calls_lstmopt_ops(program), "dynamic_dims": dynamic_dims(program)}
    if not compiled:
        torch.export.save(program, buffer, extra_files={METADATA_NAME: _json({**metadata, "pt2": how})})
        return how
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=buffer)
    except Exception as exc:  # a compiler missing or failing: inductor's errors run to pages
        raise UsageError(f"AOTInductor cannot compile this model ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}); write it with --format pt2") from exc
    with zipfile.ZipFile(buffer, "a") as archive:
        prefix = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{prefix}/extra/{METADATA_NAME}", _json({**metadata, "pt2": how}))
    return how


def _pickle(model, buffer) -> None:
    """``torch.save`` of the whole model; a class pickle cannot name (defined inside a function, or a lambda
    held by the model) is the user's to fix, and says how."""
    import pickle

    try:
        torch.save(model, buffer)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        message = " ".join(str(exc).split())
        if "pickle" not in message.lower():
            raise
        raise UsageError(f"cannot write the model as a pickle ({message}): a pickle names each class by its import "
                         "path, so classes and functions defined inside a function cannot be saved; define them at "
                         "module level, or use --format torchscript") from exc


# How the LSTMs table and the report describe an LSTM that a trace recorded as nn.LSTM's own op.
TRACED_AS_OP = {"kernel": "stock", "sequence_kernel": "stock", "exact": True,
                "reason": "traced as nn.LSTM's own op: a trace cannot hand a PackedSequence to a scripted LSTM"}


def native_kernel_note(lstms: Sequence[str], format: str) -> str:
    """What loading an artifact whose ``lstms`` run the native kernel takes, in one sentence."""
    from lstmopt.kernels.native import LOAD_LINE

    names = ", ".join(name or "<model>" for name in lstms)
    if format == "torchscript":
        return (f"{names} run lstmopt's native kernel: where the artifact is loaded, run `{LOAD_LINE}` "
                "before torch.jit.load (or write it without --approx and --dtype int8 for an artifact that needs "
                "torch only)")
    if format in ("pt2", "aoti"):
        return program_note(format)
    return f"{names} run lstmopt's native kernel, which the installed lstmopt loads with the artifact"


def program_note(format: str) -> str:
    """What loading a pt2 or aoti artifact that calls lstmopt's ops takes, in one sentence."""
    from lstmopt.kernels.native import library_path

    loader = "torch.export.load" if format == "pt2" else "torch._inductor.aoti_load_package"
    return ("the program calls lstmopt's ops: where it is loaded, `import lstmopt` (or, without lstmopt, "
            f"`torch.ops.load_library({library_path() or '<lstmopt/kernels/lib/liblstmopt.so>'!r})`) before "
            f"{loader}")


def native_lstms(model) -> list:
    """The names of the LSTMs, GRUs and cells in ``model`` that run the native kernel."""
    from lstmopt.modules.cell import PackedCell
    from lstmopt.modules.gru import PackedGRU
    from lstmopt.modules.lstm import PackedLSTM

    return [name for name, m in model.named_modules()
            if isinstance(m, (PackedLSTM, PackedCell, PackedGRU)) and m.uses_native_kernel]


def _json(metadata: dict) -> str:
    return json.dumps(metadata, indent=2, sort_keys=True)


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


class GRUEntry(nn.Module):
    """The same for a model that is a bare GRU (state_dict keys gain ``gru.``)."""

    def __init__(self, gru: nn.Module) -> None:
        super().__init__()
        self.gru = gru

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.gru(input, hx)


def to_torchscript(model, samples: Sequence[tuple] = ()) -> Tuple[torch.jit.ScriptModule, dict]:
    """The model as TorchScript: scripted when its code allows, else traced on ``samples[0]`` with every
    LSTM scripted (see ``lstmopt.artifacts.tracing``); and how, ``{"method": "scripted" | "traced", "reason"}`` (a
    trace also lists ``lstms_traced_as_ops``: those fed PackedSequences, recorded as nn.LSTM's own op)."""
    model = prepare_for_inference(model)
    with _scripting_flags(model):
        return _script_or_trace(model, samples)


@contextlib.contextmanager
def _scripting_flags(model):
    """Tell modules that guard attributes while not scripted that they are being scripted: a
    LightningModule's ``trainer`` (which TorchScript and the tracer read) raises "not attached to a
    Trainer" unless ``_jit_is_scripting`` is set, as Lightning's own ``to_torchscript`` sets it."""
    owners = {cls for m in model.modules() for cls in type(m).__mro__ if "_jit_is_scripting" in vars(cls)}
    saved = {cls: vars(cls)["_jit_is_scripting"] for cls in owners}
    for cls in owners:
        cls._jit_is_scripting = True
    try:
        yield
    finally:
        for cls, value in saved.items():
            cls._jit_is_scripting = value


def _script_or_trace(model, samples: Sequence[tuple]) -> Tuple[torch.jit.ScriptModule, dict]:
    from lstmopt.artifacts.tracing import trace_with_scripted_lstms

    try:
        # On a copy: a failed torch.jit.script leaves marks on the modules it compiled (``__overloads__``),
        # which would make the trace below compile their scripted LSTMs without a forward.
        return script(tracked_copy(model)), {"method": "scripted", "reason": "the model's code is scriptable"}
    except UsageError as exc:
        why = str(exc)
    if not samples:
        raise UsageError(f"{why}; to trace it instead, pass inputs to run it on (--example-inputs FILE or "
                         "--input-shape B,T,F), or write it with --format pickle")
    try:
        traced, recorded = trace_with_scripted_lstms(model, samples[0])
    except UsageError as exc:
        raise UsageError(f"{why}; {exc}; write it with --format pickle, which needs neither") from exc
    return traced, {"method": "traced", "reason": why, "lstms_traced_as_ops": recorded}


def script(model):
    """``torch.jit.script``, with a one-line error that names the unscriptable part."""

    if isinstance(model, nn.LSTM):
        model = LSTMEntry(model)
    elif isinstance(model, nn.GRU):
        model = GRUEntry(model)
    try:
        return torch.jit.script(model)
    except Exception as exc:
        raise UsageError(f"the model's code is not scriptable: {_script_error(exc)}") from exc


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
