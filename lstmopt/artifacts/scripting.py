"""TorchScript of an optimized model: scripted when its code allows, else traced with every LSTM scripted.

Scripting compiles the forward of every submodule, called or not: a LightningModule's metrics
(torchmetrics' ``MetricCollection``), loss modules kept for training, anything its forward never runs,
can make it fail. Where the first attempt fails, the modules the forward did not call on the example
input are left out of the second (their class loses its forward and properties for TorchScript, in a copy):
the model is scripted whenever the code its forward runs is scriptable. Where that code is not (``**kwargs``,
``next(...)``, comprehension ifs), the blocker is named by file and line and the model is traced instead
(``lstmopt.artifacts.tracing``).
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the entry points below.
import contextlib
import re
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lstmopt.errors import UsageError, one_line
from lstmopt.modules.packs import tracked_copy

__all__ = ["GRUEntry", "LSTMEntry", "NO_TORCHSCRIPT", "TorchScriptGone", "quiet_torchscript", "script", "to_torchscript",
           "torchscript_gone", "uncalled_modules"]

NO_TORCHSCRIPT = ("this torch has no TorchScript ({}): write --format aoti or pt2 (the default, --format auto, writes a "
                  "pt2 program where TorchScript cannot hold the model)")


class TorchScriptGone(UsageError):
    """``torch.jit``'s entry points raise (torch is moving off TorchScript: pytorch/pytorch#189705 turns their
    deprecation warnings into errors) or are gone: no TorchScript artifact can be made or loaded."""


@contextlib.contextmanager
def quiet_torchscript():
    """Inside, torch.jit's own deprecation warnings are not shown (torch 2.14 makes them FutureWarnings, which
    print by default): the user asked lstmopt for an artifact, and calls no torch.jit entry point themselves."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is (deprecated|not supported)")
        yield


def torchscript_gone(error: "BaseException | str") -> bool:
    """Whether ``error`` is torch refusing TorchScript itself (not a model TorchScript cannot compile)."""
    text = str(error)
    return (isinstance(error, AttributeError) and "torch.jit" in text) or (
        "torch.jit" in text and "deprecated" in text and "switch to" in text.lower())


class LSTMEntry(nn.Module):
    """TorchScript cannot call a scripted nn.LSTM directly (its forward is overloaded), so a model that is
    a bare LSTM is scripted behind this Tensor-only entry point (its state_dict keys gain ``lstm.``)."""

    PREFIX = "lstm."

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        return self.lstm(input, hx)


class GRUEntry(nn.Module):
    """The same for a model that is a bare GRU (state_dict keys gain ``gru.``)."""

    PREFIX = "gru."

    def __init__(self, gru: nn.Module) -> None:
        super().__init__()
        self.gru = gru

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.gru(input, hx)


class RNNEntry(nn.Module):
    """The same for a model that is a bare RNN (state_dict keys gain ``rnn.``)."""

    PREFIX = "rnn."

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.rnn(input, hx)


_ENTRIES = {nn.LSTM: LSTMEntry, nn.GRU: GRUEntry, nn.RNN: RNNEntry}  # a bare module's entry point, by torch class


def to_torchscript(model, samples: Sequence[tuple] = ()) -> Tuple[torch.jit.ScriptModule, dict]:
    """The model as TorchScript: scripted when its code allows, else traced on ``samples[0]`` with every
    LSTM scripted (see ``lstmopt.artifacts.tracing``); and how: ``{"method": "scripted" | "traced", "reason",
    "module_prefix"}`` (where the model's modules are in the archive), with ``left_out`` (modules the forward
    never called, which scripting left out) or, for a trace, ``lstms_traced_as_ops`` (those fed
    PackedSequences, recorded as nn.LSTM's own op)."""
    model = model.eval()
    with _scripting_flags(model), quiet_torchscript():
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


def _entry_prefix(model) -> str:
    return next((entry.PREFIX for torch_class, entry in _ENTRIES.items() if isinstance(model, torch_class)), "")


def _script_or_trace(model, samples: Sequence[tuple]) -> Tuple[torch.jit.ScriptModule, dict]:
    from lstmopt.artifacts.tracing import trace_with_scripted_lstms

    scripted = {"method": "scripted", "reason": "the model's code is scriptable", "module_prefix": _entry_prefix(model)}
    try:
        # On a copy: a failed torch.jit.script leaves marks on the modules it compiled (``__overloads__``),
        # which would make the trace below compile their scripted LSTMs without a forward.
        return script(tracked_copy(model)), scripted
    except TorchScriptGone:
        raise  # nothing else TorchScript can do either
    except UsageError as exc:
        why = str(exc)
    if not samples:
        raise UsageError(f"{why}; to trace it instead, pass inputs to run it on (--example-inputs, --input-shape or "
                         "--input); or write it with --format pt2 or pickle")
    copy = tracked_copy(model)
    left_out = _leave_out(copy, uncalled_modules(copy, samples[0]))
    if left_out:
        try:
            return script(copy), {**scripted, "left_out": left_out, "reason": (
                f"the code its forward runs is scriptable ({_names(left_out)}, never called on the example input, "
                "left out)")}
        except UsageError as exc:
            why = str(exc)  # the blocker in the code the forward runs, not in a module it never calls
    try:
        traced, how = trace_with_scripted_lstms(model, samples[0])
    except UsageError as exc:
        if torchscript_gone(exc):
            raise TorchScriptGone(NO_TORCHSCRIPT.format(one_line(exc, 200))) from exc
        raise UsageError(f"{why}; tracing it failed too: {exc}; write it with --format pt2 or pickle, which need "
                         "neither") from exc
    return traced, {"method": "traced", "reason": why, **how}


def _names(names: List[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return shown


def uncalled_modules(model: nn.Module, example: Sequence) -> List[str]:
    """The submodules of ``model`` whose forward neither they nor any module inside them ran while
    ``model`` ran on ``example`` (outermost only)."""
    called: set = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: called.add(id(module)))
    try:
        with torch.no_grad():
            model(*example)
    except Exception:
        return []  # the model fails on its example: verification says so; nothing is left out
    finally:
        handle.remove()
    # lstmopt's own modules read their parts (packs) without calling them: those are never left out
    skip = tuple(f"{name}." for name, m in model.named_modules() if type(m).__module__.startswith("lstmopt."))
    uncalled: List[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(skip) or name.startswith(tuple(f"{n}." for n in uncalled)):
            continue
        if not any(id(m) in called for m in module.modules()):
            uncalled.append(name)
    return uncalled


def _leave_out(model: nn.Module, names: List[str]) -> List[str]:
    """Turn each named module of ``model`` (a copy) and everything inside it into an instance of a
    subclass that TorchScript compiles nothing of: no forward, no properties. Returns the names done."""
    done = []
    for name in names:
        for inner_name, module in list(model.get_submodule(name).named_modules(prefix=name)):
            cls = type(module)
            properties = [n for base in cls.__mro__ for n, v in vars(base).items() if isinstance(v, property)]
            try:
                shell = type(cls.__name__, (cls,), {"forward": nn.Module.forward, "__module__": cls.__module__,
                                                   "__jit_unused_properties__": properties})
                twin = shell.__new__(shell)
            except TypeError:  # a class that refuses subclasses or bare instances: left as it is
                continue
            twin.__dict__.update(module.__dict__)
            parent, _, child = inner_name.rpartition(".")
            model.get_submodule(parent)._modules[child] = twin
        done.append(name)
    return done


def script(model):
    """``torch.jit.script``, with a one-line error that names the unscriptable part."""

    for torch_class, entry in _ENTRIES.items():
        if isinstance(model, torch_class):
            model = entry(model)
            break
    try:
        return torch.jit.script(model)
    except Exception as exc:
        if torchscript_gone(exc):
            raise TorchScriptGone(NO_TORCHSCRIPT.format(one_line(exc, 200))) from exc
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
