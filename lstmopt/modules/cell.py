"""``PackedLSTMCell`` and ``PackedGRUCell``: an ``nn.LSTMCell`` or ``nn.GRUCell`` whose step costs what
its arithmetic needs.

Decoders (Tacotron2, attention and RNN-T prediction networks) and streaming models roll a cell one frame
at a time, hundreds of calls per utterance, where a small cell's time is mostly overhead. Two kernels cut
it (``lstmopt.kernels.table``, CELL and GRU_CELL):

- ``aten``, the default: ATen's own cell op (``torch._VF.lstm_cell`` or ``gru_cell``, what the torch
  cell's forward calls) called directly, with a cached zero state. Bit-identical to the torch cell, less
  the Python of its forward; at batch 1 the op's own GEMMs dominate, so this saves a few microseconds a
  step (the benchmark's cell tables, docs/performance.md).
- ``native``, where approximate kernels are allowed (``exact=False``, ``--approx``): lstmopt's native
  kernel (``kernels/csrc/lstm.cpp``) runs the step as one pass over the input and recurrent weights with
  the gates fused in, held to the approximate-kernel contract (``kernels/accuracy.py``). Where a cell's
  weights are far larger than the cache (Tacotron2's), a step costs reading them, whichever kernel runs.

As ``PackedLSTM``: the parameters are the real dense weights (same names, ``state_dict``, errors), the
packs follow them (``load_state_dict``, ``.to()``, reassignment, in-place edits), training, autograd,
autocast and other dtypes take the torch cell's own path, and pickles and TorchScript archives store the
dense weights and pack again where they are loaded.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
from typing import List, Optional, Tuple

import torch
from torch import Tensor, _VF, nn

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.native import NativePacks, run_native_cell, run_native_gru_cell
from lstmopt.modules import dispatch
from lstmopt.modules.guards import aten_cell_call, inference_call, plain_state, valid_cell
from lstmopt.modules.pack_state import OneKernel
from lstmopt.modules.packs import native_obstacle as native_weights_obstacle, tracked_copy

__all__ = ["CELL_KERNELS", "DEFAULT", "EXACT_CELL_KERNELS", "PackedGRUCell", "PackedLSTMCell", "cell_obstacle",
           "native_obstacle"]

# The same kernel names serve both cells (kernel_table.CELL and GRU_CELL).
CELL_KERNELS = kernel_table.names(kernel_table.CELL)
EXACT_CELL_KERNELS = kernel_table.names(kernel_table.CELL, exact_only=True)
DEFAULT = kernel_table.default(kernel_table.CELL)
_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_TORCH_CELLS = (nn.LSTMCell, nn.GRUCell)


def cell_obstacle(cell: nn.Module) -> Optional[str]:
    """Why ``cell`` cannot become a ``PackedLSTMCell`` or ``PackedGRUCell``, or None if it can (its exact
    kernel calls the torch cell's own op, which serves any dtype and device)."""
    if not isinstance(cell, _TORCH_CELLS):
        return f"{type(cell).__name__} is neither an nn.LSTMCell nor an nn.GRUCell"
    computed = [name for name in _names(cell) if name not in cell._parameters]
    if computed:  # before the subclass check: a parametrization makes a subclass of its own
        return f"{computed[0]} is not a parameter (computed by a hook such as weight_norm)"
    if type(cell) not in _TORCH_CELLS and not isinstance(cell, PackedCell):
        torch_cell = "nn.GRUCell" if isinstance(cell, nn.GRUCell) else "nn.LSTMCell"
        return f"{type(cell).__qualname__} subclasses {torch_cell}; its own code would be bypassed"
    return None


def native_obstacle(cell: nn.Module) -> Optional[str]:
    """Why ``cell`` cannot run the native kernel, or None if it can."""
    obstacle = cell_obstacle(cell)
    if obstacle is not None:
        return obstacle
    return native_weights_obstacle([cell._parameters[name] for name in _names(cell)])


def _plain_states(hx, gru: bool) -> Optional[list]:
    """A cell call's states as ``valid_cell`` takes them, or None if they are not plain tensors."""
    if hx is None:
        return []
    if gru:
        return [hx] if type(hx) is Tensor else None
    return list(hx) if plain_state(hx) else None


def _names(cell: nn.Module) -> tuple:
    return _NAMES if cell.bias else _NAMES[:2]


class PackedCell(OneKernel):
    """What ``PackedLSTMCell`` and ``PackedGRUCell`` share, before their torch cell class: how they are
    made, packed and scripted. ``TORCH_CELL``: that class."""

    KERNELS = CELL_KERNELS
    TORCH_CELL: type = nn.Module

    @classmethod
    def from_cell(cls, cell: nn.Module, kernel: str = DEFAULT):
        """A packed cell with a copy of ``cell``'s weights."""
        return cls.convert_(tracked_copy(cell), kernel)

    @classmethod
    def convert_(cls, cell: nn.Module, kernel: str = DEFAULT):
        """Turn ``cell`` itself into a packed cell (its identity, hooks and sharing kept)."""
        obstacle = cell_obstacle(cell)
        if obstacle is None and not isinstance(cell, cls.TORCH_CELL):
            obstacle = f"{type(cell).__name__} is not an nn.{cls.TORCH_CELL.__name__}"
        if obstacle is not None:
            raise ValueError(f"cannot pack this {cls.TORCH_CELL.__name__}: {obstacle}")
        return cls._become(cell, kernel)

    def _packed_names(self) -> list:
        return list(_names(self))

    def _native_obstacle(self) -> Optional[str]:
        return native_obstacle(self)

    def _new_native_packs(self, weights: list) -> NativePacks:
        return NativePacks([w.detach() for w in weights], self.hidden_size, 1, False, self.bias, 0,
                           "gru" if isinstance(self, nn.GRUCell) else "lstm")

    def _weight_names(self):
        return _NAMES

    def _serves_natively(self, input: Tensor, states: List[Tensor]) -> bool:
        """The scripted forward's check before the native kernel (the eager one is ``Packs.try_cell``)."""
        return (self.kernel == "native" and inference_call(self.training)
                and valid_cell(input, states, self.input_size, self.hidden_size)
                and self.native_packs.is_current(self._weights_by_name()))

    @torch.jit.unused  # Python only: a scripted module never asks
    def serves(self, input, hx) -> bool:
        """Whether the kernel in use takes this step itself rather than the torch cell's path (autotune asks).
        Python only."""
        gru = isinstance(self, nn.GRUCell)
        if self.kernel == "stock":
            return True
        if self.kernel == "aten":
            return aten_cell_call(input, hx, gru)
        states = _plain_states(hx, gru)
        return (self.uses_native_kernel and type(input) is Tensor and states is not None
                and valid_cell(input, states, self.input_size, self.hidden_size))

    def _weights_by_name(self) -> List[Tensor]:
        weights = [self.weight_ih, self.weight_hh]
        bias_ih, bias_hh = self.bias_ih, self.bias_hh
        if bias_ih is not None and bias_hh is not None:
            weights += [bias_ih, bias_hh]
        return weights

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"


class PackedLSTMCell(PackedCell, nn.LSTMCell):
    """Drop-in ``nn.LSTMCell`` for CPU inference on ATen's cell op or lstmopt's native kernel (see the
    module docstring).

    Build one with ``PackedLSTMCell.from_cell(cell)`` (a copy), like ``nn.LSTMCell``, or with
    ``lstmopt.optimize(model)`` (``exact=False`` for the native kernel).

    Example:
        >>> cell = PackedLSTMCell.from_cell(nn.LSTMCell(80, 256)).eval()
        >>> with torch.inference_mode():
        ...     h, c = cell(torch.randn(1, 80))
    """

    __jit_ignored_attributes__ = ["_state", "autotune_ms", "autotune_notes"]
    __jit_unused_properties__ = ["uses_native_kernel"]

    TORCH_CELL = nn.LSTMCell
    INPUTS = kernel_table.CELL
    kernel: str  # "aten", "native" or "stock" (lstmopt.kernels.table, CELL)
    # Present only while the native kernel is in use: a scripted cell without it loads without the library.
    native_packs: NativePacks

    def __init__(self, *args, kernel: str = DEFAULT, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_packing(kernel)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            return dispatch.cell_forward(self, input, hx)
        if hasattr(self, "native_packs"):
            states: List[Tensor] = [] if hx is None else [hx[0], hx[1]]
            if self._serves_natively(input, states):
                return run_native_cell(self.native_packs, input, hx)
        return self._stock(input, hx)

    def _stock(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        # nn.LSTMCell.forward, which a scripted subclass cannot call.
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        else:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not is_batched else hx
        ret = _VF.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            ret = (ret[0].squeeze(0), ret[1].squeeze(0))
        return ret


class PackedGRUCell(PackedCell, nn.GRUCell):
    """Drop-in ``nn.GRUCell`` for CPU inference on ATen's cell op or lstmopt's native kernel (see the
    module docstring).

    Build one with ``PackedGRUCell.from_cell(cell)`` (a copy), like ``nn.GRUCell``, or with
    ``lstmopt.optimize(model)`` (``exact=False`` for the native kernel).

    Example:
        >>> cell = PackedGRUCell.from_cell(nn.GRUCell(80, 256)).eval()
        >>> with torch.inference_mode():
        ...     h = cell(torch.randn(1, 80))
    """

    __jit_ignored_attributes__ = ["_state", "autotune_ms", "autotune_notes"]
    __jit_unused_properties__ = ["uses_native_kernel"]

    TORCH_CELL = nn.GRUCell
    INPUTS = kernel_table.GRU_CELL
    kernel: str  # "aten", "native" or "stock" (lstmopt.kernels.table, GRU_CELL)
    native_packs: NativePacks  # as PackedLSTMCell's

    def __init__(self, *args, kernel: str = DEFAULT, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_packing(kernel)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if not torch.jit.is_scripting():
            return dispatch.cell_forward(self, input, hx)
        if hasattr(self, "native_packs"):
            states: List[Tensor] = [] if hx is None else [hx]
            if self._serves_natively(input, states):
                return run_native_gru_cell(self.native_packs, input, hx)
        return self._stock(input, hx)

    def _stock(self, input: Tensor, hx: Optional[Tensor]) -> Tensor:
        # nn.GRUCell.forward, which a scripted subclass cannot call.
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        else:
            hx = hx.unsqueeze(0) if not is_batched else hx
        ret = _VF.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            ret = ret.squeeze(0)
        return ret
