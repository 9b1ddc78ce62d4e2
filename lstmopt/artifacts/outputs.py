"""Model outputs a trace cannot hold, flattened for the trace and rebuilt around it in TorchScript.

``torch.jit.trace`` records tensors, tuples, lists and dicts of tensors; real models also return dataclasses
(darts' ``PLModuleOutput``), named tuples, ``None`` in a field, or a number. As torch.export's pytree does,
the model is traced behind ``FlatOutputs``, which returns the output's tensors as one tuple, and the artifact
is a scripted ``rebuilt`` module that calls the trace and builds the output again: a named tuple stays a
named tuple of the same name and fields, a dataclass becomes one (TorchScript has no dataclass values a
loading process could receive), and ``None`` and numbers are the constants they were on the example input
(a trace freezes non-tensor values anyway; verification on other inputs catches one that varied).

The rebuilding module is generated source (the output's structure decides its code), registered with
``linecache`` so that TorchScript can read it like any module's.
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import sys
import types
from typing import Any

import torch
from torch import Tensor, nn

from lstmopt.errors import UsageError

__all__ = ["FlatOutputs", "describe_output", "needs_rebuilding", "rebuilt"]

_counter = itertools.count()


def needs_rebuilding(output: Any) -> bool:
    """Whether a trace cannot return ``output`` as it is (tensors, tuples, lists, dicts of tensors)."""
    if isinstance(output, Tensor):
        return False
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return any(needs_rebuilding(item) for item in output)
    if isinstance(output, list):
        return not output or any(needs_rebuilding(item) for item in output)
    if isinstance(output, dict):
        return not output or any(not isinstance(k, str) or needs_rebuilding(v) for k, v in output.items())
    return True


def _record_fields(value: Any):
    """The field names and values of a named tuple or a dataclass instance, else None."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(value._fields), list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value) if f.init]
        return names, [getattr(value, name) for name in names]
    return None


def describe_output(value: Any, leaves: list) -> tuple:
    """The structure of ``value`` as nested tuples (tensors appended to ``leaves`` and named by index);
    ``UsageError`` for what a TorchScript artifact cannot return."""
    if isinstance(value, Tensor):
        leaves.append(value)
        return ("tensor", len(leaves) - 1)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("const", value)
    record = _record_fields(value)
    if record is not None:
        names, values = record
        return ("record", type(value).__name__, tuple(names), tuple(describe_output(v, leaves) for v in values))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(describe_output(v, leaves) for v in value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("dict", tuple(value), tuple(describe_output(v, leaves) for v in value.values()))
    raise UsageError(f"its output holds a {type(value).__module__}.{type(value).__qualname__} object, which a "
                     "TorchScript artifact cannot return")


class FlatOutputs(nn.Module):
    """``model`` returning its output's tensors as one tuple, in ``describe_output``'s order: what a trace
    records."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        leaves: list = []
        describe_output(self.model(*args), leaves)
        return tuple(leaves)


class _Source:
    """The generated module's source: record classes first, then the module."""

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.names: dict = {}

    def record_class(self, name: str, fields: tuple, types_: list[str]) -> str:
        key = (name, fields, tuple(types_))
        if key not in self.names:
            unique = name if name not in {n for n, *_ in self.names} else f"{name}_{len(self.names)}"
            body = "\n".join(f"    {field}: {annotation}" for field, annotation in zip(fields, types_))
            self.classes.append(f"class {unique}(NamedTuple):\n{body or '    pass'}\n")
            self.names[key] = unique
        return self.names[key]

    def expression(self, node: tuple) -> tuple[str, str]:
        """(code, TorchScript type) that builds ``node`` from ``flat``."""
        kind = node[0]
        if kind == "tensor":
            return f"flat[{node[1]}]", "Tensor"
        if kind == "const":
            value = node[1]
            return repr(value), "Optional[Tensor]" if value is None else type(value).__name__
        if kind == "record":
            _, name, fields, children = node
            built = [self.expression(child) for child in children]
            cls = self.record_class(name, fields, [annotation for _, annotation in built])
            return f"{cls}({', '.join(code for code, _ in built)})", cls
        children = [self.expression(child) for child in node[-1]]
        codes, annotations = [c for c, _ in children], [a for _, a in children]
        if kind == "tuple":
            return "(" + "".join(f"{code}, " for code in codes) + ")", f"Tuple[{', '.join(annotations) or '()'}]"
        if len(set(annotations)) > 1:
            raise UsageError(f"its output holds a {kind} of mixed types ({', '.join(sorted(set(annotations)))}), "
                             "which TorchScript cannot type")
        element = annotations[0] if annotations else "Tensor"
        if kind == "list":
            return f"[{', '.join(codes)}]", f"List[{element}]"
        items = ", ".join(f"{key!r}: {code}" for key, code in zip(node[1], codes))
        return f"{{{items}}}", f"Dict[str, {element}]"


def rebuilt(traced: torch.jit.ScriptModule, structure: tuple) -> torch.jit.ScriptModule:
    """A scripted module that calls ``traced`` (a trace of ``FlatOutputs``) with the same arguments and
    returns the output ``structure`` (from ``describe_output``) again."""
    source = _Source()
    code, annotation = source.expression(structure)
    arguments = [(arg.name, arg.type.annotation_str) for arg in traced.forward.schema.arguments[1:]]
    signature = "".join(f", {name}: {annotation}" for name, annotation in arguments)
    call = ", ".join(name for name, _ in arguments)
    text = ("from typing import Dict, List, NamedTuple, Optional, Tuple\n\nimport torch\nfrom torch import Tensor\n\n\n"
            + "\n\n".join(source.classes)
            + f"\n\nclass Rebuilt(torch.nn.Module):\n"
              f"    def __init__(self, traced):\n        super().__init__()\n        self.traced = traced\n\n"
              f"    def forward(self{signature}) -> {annotation}:\n"
              f"        flat = self.traced({call})\n        return {code}\n")
    module = _load_source(text)
    return torch.jit.script(module.Rebuilt(traced))


def _load_source(text: str) -> types.ModuleType:
    """``text`` as a module TorchScript can read the source of (``linecache``, as for code typed in a shell)."""
    name = f"lstmopt.artifacts._rebuilt_{next(_counter)}"
    filename = f"<{name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # TorchScript resolves the classes' qualified names through it
    exec(compile(text, filename, "exec", dont_inherit=True), module.__dict__)  # not this file's __future__
    return module
