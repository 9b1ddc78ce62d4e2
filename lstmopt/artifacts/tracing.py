"""TorchScript for models whose own code cannot be scripted: trace them, with every LSTM scripted.

Much real model code is not scriptable (tuple unpacking into ``_``, ``**kwargs``, dict outputs, helpers
from other libraries). ``torch.jit.trace`` runs such a model once on example inputs and records the ops
it performs; on its own it would record the stock ``aten::lstm`` (the packs are opaque constants it cannot
hold). So each ``PackedLSTM`` is first scripted, as a submodule with a single tensor ``forward``: the
tracer records a call into it, and the scripted LSTM keeps its packed op, its checks and a free batch
size and sequence length. (An LSTM fed PackedSequences runs nn.LSTM's own op, packed or not; a trace
records that op.) What tracing freezes is the model's own Python: control flow and non-tensor
values as they were on the example inputs. Verification at other batch sizes and lengths catches a trace
that specialized.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the forward below.
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.artifacts.outputs import FlatOutputs, describe_output, needs_rebuilding, rebuilt
from lstmopt.errors import UsageError, one_line
from lstmopt.modules.lstm import PackedLSTM, TracedLSTM
from lstmopt.modules.pack_state import PackedModule
from lstmopt.modules.packs import shallow_as, tracked_copy

__all__ = ["TracedLSTM", "trace_with_scripted_lstms", "tracing_caveat"]


def tracing_caveat(scripted_lstms: int) -> str:
    """What a traced artifact freezes, and (when there are any) that its LSTMs stay free."""
    text = ("the artifact was traced: Python control flow and non-tensor values in the model's own code are frozen "
            "as they were on the example inputs")
    if scripted_lstms:
        text += f" ({'its LSTM is' if scripted_lstms == 1 else f'each of its {scripted_lstms} LSTMs is'} scripted and stays free)"
    return text


class _ScriptedSuperForward(nn.LSTM):
    """What ``super().forward`` reaches in a packed subclass being traced: its scripted twin (child
    ``scripted_lstm``) for tensors; a PackedSequence, which a traced caller cannot hand a scripted module, takes
    nn.LSTM's own op, which the trace records."""

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            return nn.LSTM.forward(self, input, hx)
        return self._modules["scripted_lstm"](input, hx)


def _under_own_forward(module: PackedLSTM) -> PackedLSTM:
    """Turn ``module`` (a packed subclass of a user's nn.LSTM subclass, in the copy being traced) into a
    shell whose own forward the trace runs and records, with ``super().forward`` calling a scripted
    ``TracedLSTM`` on the same parameters (child ``scripted_lstm``, under whose name the artifact's state dict then
    holds them)."""
    twin = torch.jit.script(shallow_as(TracedLSTM, module))  # shares the parameters, which scripting keeps
    base = type(module).packed_base
    module.__class__ = type(base)(base.__name__, (base, _ScriptedSuperForward), {"__module__": base.__module__})
    del module._modules["packed_layers"]
    module._modules["scripted_lstm"] = twin
    # Its own copies of the weights would be a second state-dict entry for each tensor, one that a
    # loaded archive lets load_state_dict change without the twin seeing it: the subclass's code can
    # still read them (plain attributes), the twin alone holds them as parameters.
    for name in list(module._parameters):
        module.__dict__[name] = module._parameters.pop(name)
    return module


def trace_with_scripted_lstms(model: nn.Module, example: Sequence) -> Tuple[torch.jit.ScriptModule, dict]:
    """``torch.jit.trace`` of a copy of ``model`` on ``example`` (a tuple of forward arguments), every
    ``PackedLSTM`` that receives tensors replaced by its scripted self. One that receives a PackedSequence
    (which a trace cannot hand a scripted module) stays as it is: the tracer records nn.LSTM's own op for
    it, as eager runs it for packed sequences. An output a trace cannot return (a dataclass, a named tuple,
    None in it) is flattened for the trace and rebuilt around it (``lstmopt.artifacts.outputs``). Returns the
    trace and ``{"lstms_traced_as_ops": the names of those LSTMs, "module_prefix": where the model's modules
    are in it}``."""
    _check_traceable(example)
    copy = tracked_copy(model)
    takes_sequences, output = _lstms_given_packed_sequences(copy, example)
    recorded = [name for name, module in copy.named_modules() if id(module) in takes_sequences]
    scripted: dict[int, torch.jit.ScriptModule] = {}
    for name, module in list(copy.named_modules(remove_duplicate=False)):
        if not isinstance(module, PackedModule):
            continue
        if id(module) in takes_sequences:
            # The trace records the torch module's op for it: packs would be dead weight in the archive (and
            # native ones would make it need lstmopt's library to load).
            module.use_stock_kernels()
        elif hasattr(type(module), "packed_base"):  # a packed subclass of a user's nn.LSTM subclass
            if id(module) not in scripted:  # its own forward is traced, around its scripted self
                scripted[id(module)] = _under_own_forward(module)
        elif name:  # its scripted copy with one tensor forward serves the trace
            parent_name, _, child = name.rpartition(".")
            replacement = scripted.setdefault(id(module), module.scripted_for_trace())  # shared ones stay shared
            setattr(copy.get_submodule(parent_name), child, replacement)
    structure = describe_output(output, []) if needs_rebuilding(output) else None
    try:
        with torch.no_grad():
            traced = torch.jit.trace(copy.eval() if structure is None else FlatOutputs(copy).eval(), tuple(example),
                                     check_trace=False, strict=False)
    except Exception as exc:
        raise UsageError(f"{type(exc).__name__}: {one_line(exc)}") from exc
    if structure is None:
        return traced, {"lstms_traced_as_ops": recorded, "module_prefix": ""}
    return rebuilt(traced, structure), {"lstms_traced_as_ops": recorded, "module_prefix": "traced.model.",
                                        "output_rebuilt": True}


def _check_traceable(example: Sequence) -> None:
    """A trace takes tensors, in tuples, lists and dicts: say which argument is something else."""
    def bad(value):
        if isinstance(value, Tensor):
            return None
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return next((b for b in map(bad, value) if b is not None), None)
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return next((b for b in map(bad, value.values()) if b is not None), None)
        return "None" if value is None else f"a {type(value).__module__}.{type(value).__qualname__} object"

    for i, argument in enumerate(example):
        found = bad(argument)
        if found is not None:
            raise UsageError(f"a trace takes tensors (in tuples, lists and dicts) as inputs, and argument {i} of the "
                             f"example input holds {found}")


def _lstms_given_packed_sequences(model: nn.Module, example: Sequence) -> Tuple[set[int], object]:
    """ids of the PackedLSTMs that receive a PackedSequence when ``model`` runs on ``example``, and its output."""
    found: set[int] = set()

    def note(module, args):
        if args and isinstance(args[0], PackedSequence):
            found.add(id(module))

    handles = [m.register_forward_pre_hook(note) for m in model.modules() if isinstance(m, PackedModule)]
    try:
        with torch.no_grad():
            output = model.eval()(*example)
    except Exception as exc:
        raise UsageError(f"the model fails on the example input: {type(exc).__name__}: {one_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()
    return found, output
