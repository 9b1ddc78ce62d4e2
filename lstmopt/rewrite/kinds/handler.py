"""``Handler``: what the rewrite knows about one kind of recurrent module; ``Request``: what it was asked for.

A kind is one handler (``lstmopt.rewrite.kinds``, keyed by the torch classes it takes): ``decide`` says
whether a module of that kind is packed, on which kernels and why; ``convert`` swaps it in the model;
``with_kernels`` reads back what autotune chose. ``plan``, ``optimize`` and ``with_kernels`` in
``lstmopt.rewrite.swap`` are one loop each over the model, asking the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.modules.packs import dtype_name
from lstmopt.rewrite.decision import Decision, FilterFn

__all__ = ["Handler", "OneKernelHandler", "Request", "autotune_note", "in_float32"]


@dataclass(frozen=True)
class Request:
    """The keyword arguments of ``plan`` and ``optimize``: the dtype asked for (None keeps each module's),
    the user's filter, and ``exact`` (False admits the approximate kernels, the CLI's ``--approx``)."""

    dtype: Optional[torch.dtype] = None
    filter_fn: Optional[FilterFn] = None
    exact: bool = True

    def excludes(self, module: nn.Module, name: str) -> bool:
        return self.filter_fn is not None and not self.filter_fn(module, name)


class Handler:
    """One kind of recurrent module. ``kind`` is the name its decisions carry (``Decision.kind``)."""

    kind: str = ""
    packed_classes: tuple[type, ...] = ()  # lstmopt's modules of this kind (``lstmopt.modules``)
    exact_type_only = False  # True: subclasses of its torch classes are not of this kind (their own code runs)

    def is_packed(self, module: nn.Module) -> bool:
        return isinstance(module, self.packed_classes)

    def decide(self, module: nn.Module, name: str, aliases: tuple[str, ...], request: Request) -> Decision:
        """Whether ``module`` is packed, on which kernels, and why; changes nothing."""
        raise NotImplementedError

    def convert(self, model: nn.Module, decision: Decision, request: Request) -> None:
        """Swap the module ``decision`` names (packed) in ``model`` for lstmopt's."""
        raise NotImplementedError

    def with_kernels(self, decision: Decision, module: nn.Module) -> Decision:
        """``decision`` updated with what ``module`` (lstmopt's, after autotune) runs."""
        return decision


def in_float32(decision: Decision, dtype: Optional[torch.dtype]) -> Decision:
    """A module whose kind the weights ``dtype`` asks for do not serve (``kernels.table.WEIGHTS_FORMATS``) runs
    float32, and its reason says so (the table and the report show it; nothing runs at float32 unsaid)."""
    asked = dtype_name(dtype) if dtype in (torch.bfloat16, torch.int8) else None
    if asked and decision.packed and decision.packed_dtype == "float32" and not decision.reason.startswith("float32"):
        weights = kernel_table.weights_format(asked)
        if decision.kind not in weights.kinds:
            return replace(decision, reason=f"float32, not {asked} ({weights.kind_obstacle()}): {decision.reason}")
    return decision


def autotune_note(kernel: kernel_table.Kernel, measured: Optional[str]) -> Optional[str]:
    """Why autotune picked ``kernel`` over the default, in the words of the LSTMs table (with what it
    measured, the module's ``autotune_notes``); None for the default."""
    if kernel.default or not kernel.chosen_because:
        return None
    text = kernel.chosen_because + (f" ({measured})" if measured and not measured.startswith("kept") else "")
    return text + ("" if kernel.exact else f"; {CONTRACT}, not bit-identical")


class OneKernelHandler(Handler):
    """A kind whose packed module runs one kernel for every call (``OneKernel``: the cells, the GRU)."""

    note_key = ""  # the key of autotune's note on the module (``autotune_notes``)
    takes_sequences = False  # PackedSequences run the same kernel (``Decision.sequence_kernel``)

    def with_kernels(self, decision: Decision, module: nn.Module) -> Decision:
        if not self.is_packed(module):
            return decision
        kernel = kernel_table.find(module.kernel, module.INPUTS)
        decision = replace(decision, kernel=module.kernel, autotune_ms=module.autotune_ms, exact=kernel.exact,
                           sequence_kernel=module.kernel if self.takes_sequences else None)
        note = module.autotune_notes.get(self.note_key)
        return replace(decision, reason=f"autotune: {autotune_note(kernel, note) or note}") if note else decision
