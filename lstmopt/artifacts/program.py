"""``--format pt2``: a ``torch.export`` program of an optimized model that runs at the optimized model's speed.

A plain ``torch.export.export`` of an optimized model records nn.LSTM's decomposition on the dense
parameters, which loads with torch alone but runs at eager speed: a program holds no packs. Here each
LSTM (and each native-kernel GRU) is recorded as lstmopt's op on its dense parameters for the kernel it
runs (``lstmopt/kernels/csrc/dense.cpp``): the program's state dict holds the true weights, and the op
packs them on its first call, for the CPU it runs on. Loading such a program needs the ops registered
first, by ``import lstmopt`` or, without lstmopt, ``torch.ops.load_library(path)``
(``lstmopt.artifacts.writing.program_note`` says it in the report).

Every dimension of every tensor input is exported as ``Dim.AUTO``: torch.export keeps dynamic what the
model lets be (batch, time) and specializes the rest (features; any dimension of size 0 or 1 in the
example); ``dynamic_dims`` says which stayed dynamic, for the report.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch.export import Dim, ExportedProgram

from lstmopt.errors import UsageError
from lstmopt.kernels import native
from lstmopt.modules.dispatch import recording_dense_ops

__all__ = ["calls_lstmopt_ops", "dynamic_dims", "export_program"]


def export_program(model: torch.nn.Module, example: tuple) -> ExportedProgram:
    """``model`` (optimized) as a program on lstmopt's dense ops, with every tensor input's dimensions
    dynamic where the model allows; nn.LSTM's own graph where the native library is unavailable."""
    dynamic = tuple({i: Dim.AUTO for i in range(arg.dim())} if isinstance(arg, torch.Tensor) else None
                    for arg in example)
    try:
        with recording_dense_ops() if native.load(quiet=True) else contextlib.nullcontext(), torch.no_grad():
            return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export's many refusals: data-dependent control flow, unsupported ops
        first = " ".join(str(exc).split())[:400]
        raise UsageError(f"torch.export cannot export this model ({type(exc).__name__}: {first}); "
                         "write it with --format torchscript or --format pickle") from exc


def calls_lstmopt_ops(program: ExportedProgram) -> bool:
    """Whether loading ``program`` needs lstmopt's ops registered first."""
    return any(node.op == "call_function" and str(node.target).startswith("lstmopt.")
               for node in program.graph.nodes)


def dynamic_dims(program: ExportedProgram) -> list[Sequence[int]]:
    """Per user input of ``program``, the dimensions that stayed dynamic."""
    shapes = []
    for spec in program.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        value = next(n for n in program.graph.nodes if n.name == spec.arg.name).meta.get("val")
        shapes.append([i for i, size in enumerate(getattr(value, "shape", ())) if not str(size).isdigit()])
    return shapes
