"""torch.ao's dynamic-quantized LSTM, GRU and cells (``lstmopt.rewrite.quantized``): each becomes lstmopt's
module of its kind, on the weights it holds."""

from __future__ import annotations

from torch import nn

from lstmopt.kernels import native, table as kernel_table
from lstmopt.modules.cell import PackedGRUCell, PackedLSTMCell
from lstmopt.modules.gru import PackedGRU
from lstmopt.modules.lstm import PackedLSTM
from lstmopt.rewrite import quantized
from lstmopt.rewrite.decision import Decision
from lstmopt.rewrite.kinds.handler import Handler, Request

__all__ = ["QuantizedHandler"]


class QuantizedHandler(Handler):
    """Serves every torch.ao dynamic class; ``kind`` is per module (``quantized.quantized_kind``). A subclass
    of one may compute otherwise than its weights say: it stays as it is."""

    exact_type_only = True

    def decide(self, module: nn.Module, name: str, aliases: tuple[str, ...], request: Request) -> Decision:
        kind, found = quantized.quantized_kind(module), quantized.quantized_dtype(module)
        what = f"torch.ao dynamic-quantized ({found}) {kind}"
        kernel = sequence_kernel = packed_dtype = None
        if request.excludes(module, name):
            packed, reason = False, "excluded by filter_fn"
        elif (obstacle := quantized.obstacle(module)) is not None:
            packed, reason = False, obstacle
        elif kind == "LSTM" and found == "qint8" and native.load(quiet=True):
            packed, packed_dtype, kernel, sequence_kernel = True, "int8", "native", "native"
            reason = (f"{what}: its int8 weights, requantized per gate row, on lstmopt's native kernel; error "
                      "against the quantized original measured")
        elif kind == "LSTM":
            packed, packed_dtype = True, "float32"
            kernel = kernel_table.default(kernel_table.TENSOR)
            sequence_kernel = kernel_table.default(kernel_table.SEQUENCE)
            reason = (f"{what}: its dequantized weights on the packed oneDNN kernel; error against the quantized "
                      "original measured")
        else:
            packed, packed_dtype, kernel = True, "float32", "native"
            sequence_kernel = "native" if kind == "GRU" else None
            reason = (f"{what}: its dequantized weights on lstmopt's native kernel; error against the quantized "
                      "original measured")
        layered = kind in ("LSTM", "GRU")
        return Decision(
            name=name, aliases=aliases, input_size=module.input_size, hidden_size=module.hidden_size,
            num_layers=module.num_layers if layered else 1, bidirectional=module.bidirectional if layered else False,
            bias=module.bias, batch_first=module.batch_first if layered else False, proj_size=0, dtype=found,
            packed=packed, packed_dtype=packed_dtype, exact=not packed, reason=reason, kernel=kernel,
            sequence_kernel=sequence_kernel, kind=kind)

    def convert(self, model: nn.Module, decision: Decision, request: Request) -> None:
        """Put lstmopt's module for the torch.ao module ``decision`` names in its place (and its aliases')."""
        plain = quantized.dequantized(model.get_submodule(decision.name))
        if decision.kind == "LSTM":
            replacement = PackedLSTM.convert_(plain)
            if decision.kernel == "native":
                replacement.use_kernel("native", sequence_kernel="native", native_weights=decision.packed_dtype)
        else:
            packed_class = {"GRU": PackedGRU, "GRUCell": PackedGRUCell, "LSTMCell": PackedLSTMCell}[decision.kind]
            replacement = packed_class.convert_(plain, decision.kernel)
        for name in (decision.name, *decision.aliases):
            parent, _, child = name.rpartition(".")
            if not name:
                raise ValueError("a torch.ao module given alone is not rebuilt in place; optimize the model that "
                                 "holds it")
            model.get_submodule(parent)._modules[child] = replacement
