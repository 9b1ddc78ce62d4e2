"""The ``nn.GRU`` kind: ``PackedGRU`` on lstmopt's native kernel, with ``--approx`` only (a GRU has no exact
kernel: eager runs its own cell loop)."""

from __future__ import annotations

from torch import nn

from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.modules.gru import PackedGRU, gru_obstacle
from lstmopt.modules.packs import dtype_name
from lstmopt.rewrite.decision import Decision
from lstmopt.rewrite.kinds.handler import OneKernelHandler, Request, in_float32

__all__ = ["GRUHandler", "NO_EXACT_GRU"]

NO_EXACT_GRU = ("nn.GRU has no exact kernel (eager runs its own cell loop); --approx runs it on lstmopt's "
                "native kernel")


class GRUHandler(OneKernelHandler):
    kind = "GRU"
    packed_classes = (PackedGRU,)
    note_key = "gru"
    takes_sequences = True

    def decide(self, gru: nn.GRU, name: str, aliases: tuple[str, ...], request: Request) -> Decision:
        kernel = None
        if self.is_packed(gru):
            packed, reason, kernel = True, "already a PackedGRU", gru.kernel
        elif request.excludes(gru, name):
            packed, reason = False, "excluded by filter_fn"
        elif request.exact:
            packed, reason = False, NO_EXACT_GRU
        elif (obstacle := gru_obstacle(gru)) is not None:
            packed, reason = False, obstacle
        else:
            packed, reason, kernel = True, f"lstmopt's native kernel (nn.GRU has no exact kernel), {CONTRACT}", "native"
        found = dtype_name(gru._flat_weights[0].dtype)
        return in_float32(Decision(
            name=name, aliases=aliases, input_size=gru.input_size, hidden_size=gru.hidden_size,
            num_layers=gru.num_layers, bidirectional=gru.bidirectional, bias=gru.bias, batch_first=gru.batch_first,
            proj_size=0, dtype=found, packed=packed, packed_dtype=found if packed else None,
            exact=not packed or kernel == "stock", reason=reason, kernel=kernel if packed else None,
            autotune_ms=getattr(gru, "autotune_ms", None), sequence_kernel=kernel if packed else None, kind="GRU"),
            request.dtype)

    def convert(self, model: nn.Module, decision: Decision, request: Request) -> None:
        PackedGRU.convert_(model.get_submodule(decision.name), decision.kernel)
