"""The ``nn.GRU`` and ``nn.RNN`` kinds: ``PackedGRU`` and ``PackedRNN`` on lstmopt's native kernel, with
``--approx`` only (neither has an exact kernel: eager runs its own cell loop)."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.modules.gru import PackedGRU, gru_obstacle
from lstmopt.modules.packs import dtype_name
from lstmopt.modules.rnn import PackedRNN, rnn_obstacle
from lstmopt.rewrite.decision import Decision
from lstmopt.rewrite.kinds.handler import OneKernelHandler, Request, in_float32

__all__ = ["GRU", "OneStateHandler", "RNN"]


class OneStateHandler(OneKernelHandler):
    takes_sequences = True

    def __init__(self, torch_class: type, packed_class: type, obstacle: Callable[[nn.Module], Optional[str]]):
        self.kind = torch_class.__name__
        self.packed_classes = (packed_class,)
        self.note_key = self.kind.lower()  # autotune's KernelChoice.inputs for this kind
        self.obstacle = obstacle

    def decide(self, module: nn.Module, name: str, aliases: tuple[str, ...], request: Request) -> Decision:
        kernel = None
        if self.is_packed(module):
            packed, reason, kernel = True, f"already a {type(module).__name__}", module.kernel
        elif request.excludes(module, name):
            packed, reason = False, "excluded by filter_fn"
        elif request.exact:
            packed, reason = False, (f"nn.{self.kind} has no exact kernel (eager runs its own cell loop); --approx "
                                     "runs it on lstmopt's native kernel")
        elif (obstacle := self.obstacle(module)) is not None:
            packed, reason = False, obstacle
        else:
            packed, reason, kernel = (True, f"lstmopt's native kernel (nn.{self.kind} has no exact kernel), {CONTRACT}",
                                      "native")
        found = dtype_name(module._flat_weights[0].dtype)
        return in_float32(Decision(
            name=name, aliases=aliases, input_size=module.input_size, hidden_size=module.hidden_size,
            num_layers=module.num_layers, bidirectional=module.bidirectional, bias=module.bias,
            batch_first=module.batch_first, proj_size=0, dtype=found, packed=packed,
            packed_dtype=found if packed else None, exact=not packed or kernel == "stock", reason=reason,
            kernel=kernel if packed else None, autotune_ms=getattr(module, "autotune_ms", None),
            sequence_kernel=kernel if packed else None, kind=self.kind), request.dtype)

    def convert(self, model: nn.Module, decision: Decision, request: Request) -> None:
        self.packed_classes[0].convert_(model.get_submodule(decision.name), decision.kernel)


GRU = OneStateHandler(nn.GRU, PackedGRU, gru_obstacle)
RNN = OneStateHandler(nn.RNN, PackedRNN, rnn_obstacle)
