"""``PackedGRU``: an ``nn.GRU`` on lstmopt's native kernel.

GRUs are as common as LSTMs on CPU (speech enhancement, wake words, recommenders), and PyTorch has no
oneDNN path for them. What a packed GRU shares with a packed ``nn.RNN`` (packing, the scripted and eager
paths, the guards) is in ``one_state.py``; here is what is the GRU's own: its class, its cell, its ops and its
fallback. Kernels (``lstmopt.kernels.table``, GRU): ``native``, and ``stock`` (nn.GRU itself).
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.native import NativePacks, run_native_gru
from lstmopt.modules.one_state import PackedOneState, eager, one_state_obstacle
from lstmopt.modules.packs import tracked_copy

__all__ = ["GRU_KERNELS", "PackedGRU", "TracedGRU", "gru_obstacle"]

GRU_KERNELS = kernel_table.names(kernel_table.GRU)


def gru_obstacle(gru: nn.Module) -> Optional[str]:
    """Why ``gru`` cannot run on the native kernel here, or None if it can."""
    return one_state_obstacle(gru, nn.GRU)




class PackedGRU(PackedOneState, nn.GRU):
    """Drop-in ``nn.GRU`` for CPU inference on lstmopt's native kernel (see the module docstring).

    Build one with ``PackedGRU.from_gru(gru)`` (a copy), like ``nn.GRU``, or with
    ``lstmopt.optimize(model, exact=False)``.

    Example:
        >>> gru = PackedGRU.from_gru(nn.GRU(80, 256, num_layers=2)).eval()
        >>> with torch.inference_mode():
        ...     output, h = gru(torch.randn(1, 1, 80))
    """

    __jit_ignored_attributes__ = ["_state", "autotune_ms", "autotune_notes"]
    __jit_unused_properties__ = ["uses_native_kernel", *nn.GRU.__jit_unused_properties__]

    TORCH_CLASS = nn.GRU
    KERNELS = GRU_KERNELS
    INPUTS = kernel_table.GRU

    @classmethod
    def from_gru(cls, gru: nn.GRU, kernel: str = "native") -> "PackedGRU":
        """A ``PackedGRU`` with a copy of ``gru``'s weights."""
        return cls.convert_(tracked_copy(gru), kernel)

    def _cell(self) -> str:
        return "gru"

    def _native_call(self, packs: NativePacks, input: Tensor, batch_sizes: Optional[Tensor], hx: Optional[Tensor],
                     batch_first: bool) -> Tuple[Tensor, Tensor]:
        return run_native_gru(packs, input, batch_sizes, hx, batch_first)

    def _dense_call(self, input: Tensor, hx: Optional[Tensor], weights: List[Tensor]):
        return tuple(torch.ops.lstmopt.gru_dense(input, hx, weights, self.hidden_size, self.num_layers,
                                                 self.bidirectional, self.batch_first, self.bias))

    def _rank_error(self, dim: int) -> str:
        return f"GRU: Expected input to be 2D or 3D, got {dim}D instead"

    def _stock_tensor_call(self, input: Tensor, hx: Tensor, weights: List[Tensor]) -> Tuple[Tensor, Tensor]:
        result = _VF.gru(input, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                         self.bidirectional, self.batch_first)
        return result[0], result[1]

    def _stock_sequence_call(self, data: Tensor, batch_sizes: Tensor, hx: Tensor,
                             weights: List[Tensor]) -> Tuple[Tensor, Tensor]:
        result = _VF.gru(data, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                         self.bidirectional)
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


class TracedGRU(PackedGRU):
    """The same for a ``PackedGRU``: one tensor ``forward``, only ever used scripted."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            return PackedGRU.forward(self, input, hx)
        return self._scripted_tensor(input, hx)

    @torch.jit.export
    def flatten_parameters(self) -> Tensor:  # type: ignore[override]
        """As ``TracedLSTM.flatten_parameters``."""
        return torch.empty(0)


PackedGRU.TRACED = TracedGRU
