"""``PackedLSTMCell``: an ``nn.LSTMCell`` whose step costs what its arithmetic needs.

Decoders (Tacotron2, attention and RNN-T prediction networks) roll an ``nn.LSTMCell`` one frame at a
time, hundreds of calls per utterance, where a small cell's time is mostly overhead. Two kernels cut it
(``lstmopt.kernels.table``, CELL):

- ``aten``, the default: ATen's own cell op (``torch._VF.lstm_cell``, what ``nn.LSTMCell.forward`` calls)
  called directly, with a cached zero state. Bit-identical to nn.LSTMCell, less the Python of its
  forward; at batch 1 the op's own GEMMs dominate, so this saves a few microseconds a step (the benchmark's
  LSTMCell table, docs/performance.md).
- ``native``, where approximate kernels are allowed (``exact=False``, ``--approx``): lstmopt's native
  kernel (``kernels/csrc/lstm.cpp``) runs the step as one pass over the input and recurrent weights with
  the gates fused in, held to the approximate-kernel contract (``kernels/accuracy.py``).

As ``PackedLSTM``: the parameters are the real dense weights (same names, ``state_dict``, errors), the
packs follow them (``load_state_dict``, ``.to()``, reassignment, in-place edits), training, autograd,
autocast and other dtypes take nn.LSTMCell's own path, and pickles and TorchScript archives store the
dense weights and pack again where they are loaded.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
from typing import List, Optional, Tuple

import torch
from torch import Tensor, _VF, nn

from lstmopt.kernels import native
from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.native import NativePacks, run_native_cell
from lstmopt.kernels.tensor_versions import version_of
from lstmopt.modules import dispatch
from lstmopt.modules.guards import valid_cell
from lstmopt.modules.pack_state import OneKernel
from lstmopt.modules.packs import native_obstacle as native_weights_obstacle, tracked_copy

__all__ = ["CELL_KERNELS", "DEFAULT", "EXACT_CELL_KERNELS", "PackedLSTMCell", "cell_obstacle", "native_obstacle"]

CELL_KERNELS = kernel_table.names(kernel_table.CELL)
EXACT_CELL_KERNELS = kernel_table.names(kernel_table.CELL, exact_only=True)
DEFAULT = kernel_table.default(kernel_table.CELL)
_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def cell_obstacle(cell: nn.Module) -> Optional[str]:
    """Why ``cell`` cannot become a ``PackedLSTMCell``, or None if it can (its exact kernel calls
    nn.LSTMCell's own op, which serves any dtype and device)."""
    if not isinstance(cell, nn.LSTMCell):
        return f"{type(cell).__name__} is not an nn.LSTMCell"
    if type(cell) is not nn.LSTMCell and not isinstance(cell, PackedLSTMCell):
        return f"{type(cell).__qualname__} subclasses nn.LSTMCell; its own code would be bypassed"
    computed = [name for name in _names(cell) if name not in cell._parameters]
    if computed:
        return f"{computed[0]} is not a parameter (computed by a hook such as weight_norm)"
    return None


def native_obstacle(cell: nn.Module) -> Optional[str]:
    """Why ``cell`` cannot run the native kernel, or None if it can."""
    obstacle = cell_obstacle(cell)
    if obstacle is not None:
        return obstacle
    return native_weights_obstacle([cell._parameters[name] for name in _names(cell)])


def _names(cell: nn.LSTMCell) -> tuple:
    return _NAMES if cell.bias else _NAMES[:2]


class PackedLSTMCell(OneKernel, nn.LSTMCell):
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

    KERNELS = CELL_KERNELS
    kernel: str  # "aten", "native" or "stock" (lstmopt.kernels.table, CELL)
    # Present only while the native kernel is in use: a scripted cell without it loads without the library.
    native_packs: NativePacks

    def __init__(self, *args, kernel: str = DEFAULT, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_packing(kernel)

    @classmethod
    def from_cell(cls, cell: nn.LSTMCell, kernel: str = DEFAULT) -> "PackedLSTMCell":
        """A ``PackedLSTMCell`` with a copy of ``cell``'s weights."""
        return cls.convert_(tracked_copy(cell), kernel)

    @classmethod
    def convert_(cls, cell: nn.LSTMCell, kernel: str = DEFAULT) -> "PackedLSTMCell":
        """Turn ``cell`` itself into a ``PackedLSTMCell`` (its identity, hooks and sharing kept)."""
        obstacle = cell_obstacle(cell)
        if obstacle is not None:
            raise ValueError(f"cannot pack this LSTMCell: {obstacle}")
        if isinstance(cell, PackedLSTMCell):
            cell.use_kernel(kernel)
        else:
            cell.__class__ = cls
            cell._init_packing(kernel)
        return cell

    @torch.jit.export
    def repack(self) -> None:
        """Pack the current weights again (see ``PackedLSTM.repack``)."""
        if not torch.jit.is_scripting():
            self._refresh()
            return
        if hasattr(self, "native_packs"):
            self.native_packs = NativePacks([w.detach() for w in self._scripted_weights()], self.hidden_size, 1,
                                            False, self.bias)

    def _refresh(self) -> None:
        state = self._state
        with state.lock:
            if self.kernel == "native" and not native.load():  # load() said why, in one line
                self.kernel = DEFAULT
            names = list(_names(self))
            weights = [self._parameters.get(name) for name in names]
            state.native, state.packed_from = None, []
            self.__dict__.pop("native_packs", None)
            if self.kernel != "native" or any(w is None for w in weights) or native_obstacle(self) is not None:
                return
            try:
                packs = NativePacks([w.detach() for w in weights], self.hidden_size, 1, False, self.bias)
            except RuntimeError:  # weights reassigned with other shapes: nn.LSTMCell's path judges them
                return
            self.native_packs = packs
            state.native = native.module().Packs(packs.weights, packs.biases, [], self.hidden_size, 0, False, False,
                                                 names, weights)
            state.packed_from = [(name, w, version_of(w), w.data_ptr()) for name, w in zip(names, weights)]

    def _weight_names(self):
        return _NAMES

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            return dispatch.cell_forward(self, input, hx)
        if hasattr(self, "native_packs"):
            if (self.kernel == "native" and not self.training and not torch.is_grad_enabled()
                    and not torch.is_autocast_cpu_enabled()
                    and valid_cell(input, hx, self.input_size, self.hidden_size)
                    and self.native_packs.is_current(self._scripted_weights())):
                return run_native_cell(self.native_packs, input, hx)
        return self._stock(input, hx)

    def _scripted_weights(self) -> List[Tensor]:
        weights = [self.weight_ih, self.weight_hh]
        bias_ih, bias_hh = self.bias_ih, self.bias_hh
        if bias_ih is not None and bias_hh is not None:
            weights += [bias_ih, bias_hh]
        return weights

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

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"
