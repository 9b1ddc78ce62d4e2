"""The kinds of recurrent module the rewrite knows, keyed by torch class: one ``Handler`` each (``handler.py``).

A new kind is one handler module here and one line below, beside its packed module in ``lstmopt.modules``
and its kernels' rows in ``lstmopt.kernels.table``.
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from lstmopt.rewrite import quantized
from lstmopt.rewrite.kinds.cells import GRU_CELL, LSTM_CELL
from lstmopt.rewrite.kinds.handler import Handler, Request
from lstmopt.rewrite.kinds.lstm import LSTMHandler
from lstmopt.rewrite.kinds.one_state import GRU, RNN
from lstmopt.rewrite.kinds.torch_ao import QuantizedHandler

__all__ = ["Handler", "Request", "handler_for", "handlers"]


@functools.cache
def handlers() -> dict[type, Handler]:
    """torch class -> its handler. A subclass (a user's LSTM, lstmopt's own packed modules) takes its
    nearest registered base's (``handler_for``). torch.ao is imported on first use: it costs a second."""
    registry: dict[type, Handler] = {nn.LSTM: LSTMHandler(), nn.GRU: GRU, nn.LSTMCell: LSTM_CELL,
                                     nn.GRUCell: GRU_CELL, nn.RNN: RNN}
    by_ao = QuantizedHandler()
    registry.update({cls: by_ao for cls in quantized.quantized_classes()})
    return registry


def handler_for(module: nn.Module) -> Optional[Handler]:
    """The handler of ``module``'s kind, or None for a module that is not a recurrent one."""
    registry = handlers()
    for cls in type(module).__mro__:
        handler = registry.get(cls)
        if handler is not None and (cls is type(module) or not handler.exact_type_only):
            return handler
    return None
