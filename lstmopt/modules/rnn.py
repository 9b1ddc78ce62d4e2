"""``PackedRNN``: an ``nn.RNN`` (tanh or relu) on lstmopt's native kernel.

Elman RNNs run in DeepSpeech-style acoustic models, small sequence classifiers and anomaly detectors; eager
``nn.RNN`` runs a few ATen ops per step and layer, with no oneDNN path. The native kernel runs the whole call
with a block of 64 hidden units per pass (one gate per unit, ``pack_rnn``). What it shares with a packed GRU
is in ``one_state.py``; here is what is the RNN's own. Kernels (``lstmopt.kernels.table``, RNN): ``native``,
and ``stock`` (nn.RNN itself).
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.native import NativePacks, run_native_rnn
from lstmopt.modules.one_state import PackedOneState, eager, one_state_obstacle
from lstmopt.modules.packs import tracked_copy

__all__ = ["RNN_KERNELS", "PackedRNN", "TracedRNN", "rnn_obstacle"]

RNN_KERNELS = kernel_table.names(kernel_table.RNN)


def rnn_obstacle(rnn: nn.Module) -> Optional[str]:
    """Why ``rnn`` cannot run on the native kernel here, or None if it can."""
    obstacle = one_state_obstacle(rnn, nn.RNN)
    if obstacle is None and rnn.nonlinearity not in ("tanh", "relu"):
        return f"nonlinearity {rnn.nonlinearity!r} is neither 'tanh' nor 'relu'"
    return obstacle


class PackedRNN(PackedOneState, nn.RNN):
    """Drop-in ``nn.RNN`` for CPU inference on lstmopt's native kernel (see the module docstring).

    Example:
        >>> rnn = PackedRNN.from_rnn(nn.RNN(80, 256, num_layers=2, nonlinearity="relu")).eval()
        >>> with torch.inference_mode():
        ...     output, h = rnn(torch.randn(1, 1, 80))
    """

    __jit_ignored_attributes__ = ["_state", "autotune_ms", "autotune_notes"]
    __jit_unused_properties__ = ["uses_native_kernel", *nn.RNN.__jit_unused_properties__]

    TORCH_CLASS = nn.RNN
    KERNELS = RNN_KERNELS
    INPUTS = kernel_table.RNN

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, kernel: str = "native") -> "PackedRNN":
        """A ``PackedRNN`` with a copy of ``rnn``'s weights."""
        return cls.convert_(tracked_copy(rnn), kernel)

    def _native_obstacle(self) -> Optional[str]:
        return rnn_obstacle(self)

    def _cell(self) -> str:
        return "rnn_" + self.nonlinearity

    def _native_call(self, packs: NativePacks, input: Tensor, batch_sizes: Optional[Tensor], hx: Optional[Tensor],
                     batch_first: bool) -> Tuple[Tensor, Tensor]:
        return run_native_rnn(packs, input, batch_sizes, hx, batch_first)

    def _dense_call(self, input: Tensor, hx: Optional[Tensor], weights: List[Tensor]):
        return tuple(torch.ops.lstmopt.rnn_dense(input, hx, weights, self.hidden_size, self.num_layers,
                                                 self.bidirectional, self.batch_first, self.bias, self.nonlinearity))

    def _rank_error(self, dim: int) -> str:
        return f"RNN: Expected input to be 2D or 3D, got {dim}D tensor instead"

    def _stock_tensor_call(self, input: Tensor, hx: Tensor, weights: List[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.mode == "RNN_TANH":
            result = _VF.rnn_tanh(input, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                                  self.bidirectional, self.batch_first)
        else:
            result = _VF.rnn_relu(input, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                                  self.bidirectional, self.batch_first)
        return result[0], result[1]

    def _stock_sequence_call(self, data: Tensor, batch_sizes: Tensor, hx: Tensor,
                             weights: List[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.mode == "RNN_TANH":
            result = _VF.rnn_tanh(data, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout,
                                  self.training, self.bidirectional)
        else:
            result = _VF.rnn_relu(data, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout,
                                  self.training, self.bidirectional)
        return result[0], result[1]

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]: ...

    def forward(self, input, hx=None):
        if not torch.jit.is_scripting():
            return eager(self, input, hx)
        if isinstance(input, PackedSequence):
            return self._scripted_sequence(input, hx)
        else:
            return self._scripted_tensor(input, hx)


class TracedRNN(PackedRNN):
    """The same for a ``PackedRNN``: one tensor ``forward``, only ever used scripted."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            return PackedRNN.forward(self, input, hx)
        return self._scripted_tensor(input, hx)

    @torch.jit.export
    def flatten_parameters(self) -> Tensor:  # type: ignore[override]
        """As ``TracedLSTM.flatten_parameters``."""
        return torch.empty(0)


PackedRNN.TRACED = TracedRNN
