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

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Sequence, Tuple

import torch

from lstmopt.choices import FORMATS
from lstmopt.errors import UsageError, one_line
from lstmopt.artifacts.files import atomic_path, check_output_path, write_bytes
from lstmopt.artifacts.metadata import METADATA_NAME, read_metadata
from lstmopt.artifacts.scripting import (NO_TORCHSCRIPT, TorchScriptGone, quiet_torchscript, script, to_torchscript,
                                         torchscript_gone)

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
    ``{"method", "reason", "native_kernel"}`` (the LSTMs that run lstmopt's native kernel; for TorchScript also
    ``module_prefix``, where the model's modules are in the archive; for pt2 and aoti also ``lstmopt_ops``,
    whether loading needs lstmopt's library, ``program_calls``, the (op, module) of each, ``pytree_types``, the
    dataclasses a loading process must register, and ``dynamic_dims``), which the metadata records too."""
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
        metadata = {**metadata, "torchscript": how, "module_prefix": how["module_prefix"]}
        try:
            with quiet_torchscript():
                torch.jit.save(scripted, buffer, _extra_files={METADATA_NAME: _json(metadata)})
        except Exception as exc:
            if torchscript_gone(exc):
                raise TorchScriptGone(NO_TORCHSCRIPT.format(one_line(exc, 200))) from exc
            raise
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
    from lstmopt.artifacts.program import (calls_lstmopt_ops, dynamic_dims, export_program, program_calls,
                                           program_decisions, register_dataclasses)

    flag = "--format aoti" if compiled else "--format pt2"
    if not samples:
        raise UsageError(f"{flag} exports the model on an example input: give --example-inputs or --input")
    model = prepare_for_inference(model)
    try:
        pytree_types = register_dataclasses(model, samples[0])
    except UsageError:
        raise
    except Exception as exc:  # the model's own failure on its input: verification says it in full
        raise UsageError(f"the model fails on example input 0: {type(exc).__name__}: {one_line(exc)}") from exc
    program = export_program(model, samples[0])
    calls = program_calls(program)
    how = {"method": "compiled" if compiled else "exported", "reason": flag,
           "native_kernel": [name for op, name in calls if op in ("lstm_dense", "gru_dense")],
           "lstmopt_ops": calls_lstmopt_ops(program), "dynamic_dims": dynamic_dims(program),
           "program_calls": [list(call) for call in calls], "pytree_types": [list(t) for t in pytree_types]}
    metadata = {**metadata, "native_kernel": how["native_kernel"], "pt2": how}
    if "modules" in metadata:  # what the program runs, which is not always what the module did
        metadata["modules"] = program_decisions(metadata["modules"], calls)
    if not compiled:
        try:
            torch.export.save(program, buffer, extra_files={METADATA_NAME: _json(metadata)})
        except Exception as exc:  # torch.export.save's refusals are assertions deep in its serializer
            raise UsageError(f"torch.export cannot save this program ({type(exc).__name__}: {one_line(exc)})") from exc
        return how
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=buffer)
    except Exception as exc:  # a compiler missing or failing: inductor's errors run to pages
        raise UsageError(f"AOTInductor cannot compile this model ({type(exc).__name__}: "
                         f"{one_line(exc)}); write it with --format pt2") from exc
    with zipfile.ZipFile(buffer, "a") as archive:
        prefix = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{prefix}/extra/{METADATA_NAME}", _json(metadata))
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
    from lstmopt.modules.pack_state import PackedModule

    return [name for name, m in model.named_modules() if isinstance(m, PackedModule) and m.uses_native_kernel]


def _json(metadata: dict) -> str:
    return json.dumps(metadata, indent=2, sort_keys=True)


def prepare_for_inference(model):
    """Eval mode. Parameters keep their requires_grad flags: freezing them would change the numerics of
    other layers (at::matmul folds batched inputs differently when a weight requires grad), so run the
    artifact under torch.inference_mode() or torch.no_grad(), as any inference."""
    return model.eval()
