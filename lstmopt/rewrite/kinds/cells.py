"""The ``nn.LSTMCell`` and ``nn.GRUCell`` kinds: ``PackedLSTMCell`` and ``PackedGRUCell`` on ATen's cell op
(exact) or lstmopt's native kernel (``--approx``)."""

from __future__ import annotations

from torch import nn

from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.modules.cell import EXACT_CELL_KERNELS, PackedGRUCell, PackedLSTMCell, cell_obstacle, native_obstacle
from lstmopt.modules.packs import dtype_name
from lstmopt.rewrite.decision import Decision
from lstmopt.rewrite.kinds.handler import OneKernelHandler, Request, in_float32

__all__ = ["CellHandler"]


class CellHandler(OneKernelHandler):
    note_key = "cell"

    def __init__(self, torch_class: type, packed_class: type) -> None:
        self.kind = torch_class.__name__
        self.packed_classes = (packed_class,)

    def decide(self, cell: nn.Module, name: str, aliases: tuple[str, ...], request: Request) -> Decision:
        cell_exact = f"ATen's cell op called directly, bit-identical to nn.{self.kind}"
        kernel = None
        if self.is_packed(cell):
            packed, reason, kernel = True, f"already a {type(cell).__name__}", cell.kernel
        elif request.excludes(cell, name):
            packed, reason = False, "excluded by filter_fn"
        elif (obstacle := cell_obstacle(cell)) is not None:
            packed, reason = False, obstacle
        elif request.exact:
            packed, reason, kernel = True, cell_exact, "aten"
        elif (obstacle := native_obstacle(cell)) is not None:
            packed, reason, kernel = True, f"{cell_exact} (not the native kernel: {obstacle})", "aten"
        else:
            packed, reason, kernel = True, f"lstmopt's native kernel, {CONTRACT}", "native"
        found = dtype_name(cell.weight_ih.dtype)
        return in_float32(Decision(
            name=name, aliases=aliases, input_size=cell.input_size, hidden_size=cell.hidden_size, num_layers=1,
            bidirectional=False, bias=cell.bias, batch_first=False, proj_size=0, dtype=found, packed=packed,
            packed_dtype=found if packed else None, exact=not packed or kernel in EXACT_CELL_KERNELS, reason=reason,
            kernel=kernel if packed else None, autotune_ms=getattr(cell, "autotune_ms", None), kind=self.kind),
            request.dtype)

    def convert(self, model: nn.Module, decision: Decision, request: Request) -> None:
        self.packed_classes[0].convert_(model.get_submodule(decision.name), decision.kernel)


LSTM_CELL = CellHandler(nn.LSTMCell, PackedLSTMCell)
GRU_CELL = CellHandler(nn.GRUCell, PackedGRUCell)
