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
import dataclasses
from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch.export import Dim, ExportedProgram

from lstmopt.errors import UsageError, one_line
from lstmopt.kernels import native
from lstmopt.modules.dispatch import recording_dense_ops

__all__ = ["EXPORTED_AS_ATEN_CELL", "EXPORTED_AS_STOCK", "PROGRAM_OPS", "calls_lstmopt_ops", "dynamic_dims",
           "export_program", "program_calls", "program_decisions", "register_dataclasses"]

# The op a program calls for a module kind's kernel (lstmopt/kernels/csrc/dense.cpp); the cell kernel's one-step
# calls are the oneDNN op's too. Cells record ATen's cell op, which is no lstmopt op.
PROGRAM_OPS = {("LSTM", "onednn"): "onednn_lstm_dense", ("LSTM", "cell"): "onednn_lstm_dense",
               ("LSTM", "native"): "lstm_dense", ("GRU", "native"): "gru_dense",
               ("RNN", "native"): "rnn_dense"}

# How the LSTMs table and the report describe what a program records instead of lstmopt's op.
EXPORTED_AS_STOCK = {"kernel": "stock", "sequence_kernel": "stock", "exact": True,
                     "reason": "exported as nn.LSTM's own graph (a program records lstmopt's kernels for tensor "
                               "inputs only)"}
EXPORTED_AS_ATEN_CELL = {"kernel": "aten", "exact": True,
                         "reason": "exported as ATen's cell op, bit-identical (a program holds no native cell kernel)"}


def export_program(model: torch.nn.Module, example: tuple) -> ExportedProgram:
    """``model`` (optimized) as a program on lstmopt's dense ops, with every tensor input's dimensions
    dynamic where the model allows; nn.LSTM's own graph where the native library is unavailable."""
    _check_exportable(example)
    try:
        with recording_dense_ops() if native.load(quiet=True) else contextlib.nullcontext(), torch.no_grad():
            return torch.export.export(model, example, dynamic_shapes=_every_dimension_auto(model, example),
                                       strict=False)
    except Exception as exc:  # torch.export's many refusals: data-dependent control flow, unsupported ops
        first = one_line(exc, 400)
        raise UsageError(f"torch.export cannot export this model ({type(exc).__name__}: {first}); "
                         "write it with --format torchscript or --format pickle") from exc


def _check_exportable(example: tuple) -> None:
    """A program's inputs are tensors, numbers, strings and None, in containers pytree knows: name the first
    that is not (an Enum in a dataclass batch, say), which torch.export would refuse obscurely."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    for path, leaf in tree_flatten_with_path(example)[0]:
        if not (leaf is None or isinstance(leaf, (torch.Tensor, bool, int, float, str))):
            raise UsageError(f"a program takes tensors, numbers and strings as inputs, and the example input holds a "
                             f"{type(leaf).__module__}.{type(leaf).__qualname__} at args{keystr(path)}")


def _every_dimension_auto(model: torch.nn.Module, example: tuple):
    """``dynamic_shapes`` for ``example``, nested as it is (a tuple of states, a dataclass registered with
    pytree): every dimension of every tensor ``Dim.AUTO``."""
    from torch.export import ShapesCollection
    from torch.utils._pytree import tree_leaves

    shapes = ShapesCollection()
    for leaf in tree_leaves(example):
        if isinstance(leaf, torch.Tensor):
            shapes[leaf] = {i: Dim.AUTO for i in range(leaf.dim())}
    return shapes.dynamic_shapes(model, example)


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


def program_calls(program: ExportedProgram) -> list[tuple[str, Optional[str]]]:
    """(op, module name) per call of an lstmopt op in ``program``'s graph (the module from its node's stack)."""
    calls = []
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("lstmopt."):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            calls.append((str(node.target).split(".")[1], stack[-1][0] if stack else None))
    return calls


def program_decisions(decisions: Sequence, calls: Sequence[tuple[str, Optional[str]]]) -> list:
    """``decisions`` (``Decision`` objects or their dicts) as a program making these ``calls`` runs them: an
    LSTM or GRU with no lstmopt op under its name runs nn.LSTM's own graph there, a native cell ATen's cell op."""
    recorded = set(calls)
    updated = []
    for d in decisions:
        get = d.get if isinstance(d, dict) else lambda key, d=d: getattr(d, key)
        op = PROGRAM_OPS.get((get("kind"), get("kernel")))
        change = {}
        if get("packed") and get("kind") in ("LSTMCell", "GRUCell") and get("kernel") == "native":
            change = EXPORTED_AS_ATEN_CELL
        elif get("packed") and op is not None and (op, get("name")) not in recorded:
            change = {k: v for k, v in EXPORTED_AS_STOCK.items() if get("kind") == "LSTM" or k != "sequence_kernel"}
        updated.append({**d, **change} if isinstance(d, dict) else replace(d, **change))
    return updated


def register_dataclasses(model: torch.nn.Module, example: tuple) -> list[tuple[str, str, str]]:
    """Register with pytree (as ``torch.export.register_dataclass``) every dataclass ``example`` and ``model``'s
    output on it hold, which torch.export needs to export and save them. Returns (module, qualified name,
    serialized name) per class, which a process loading the program must register the same way."""
    from torch.utils._pytree import SUPPORTED_NODES, SUPPORTED_SERIALIZED_TYPES

    found: dict = {}

    def walk(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.setdefault(type(value), None)
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(example)
    with torch.no_grad():
        walk(model(*example))
    registered = []
    for cls in found:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if cls not in SUPPORTED_NODES:
            torch.export.register_dataclass(cls, serialized_type_name=name)
        serialized = SUPPORTED_SERIALIZED_TYPES.get(cls)
        if SUPPORTED_NODES[cls].flatten_with_keys_fn is None or serialized is None:
            # registered by its own package (for ONNX export, say) without what torch.export needs
            raise UsageError(f"{name} is registered with pytree by its package without "
                             f"{'keys' if SUPPORTED_NODES[cls].flatten_with_keys_fn is None else 'a serialized name'}"
                             ", which torch.export needs to export and save a program that takes or returns it")
        registered.append((cls.__module__, cls.__qualname__, serialized.serialized_type_name))
    return registered
