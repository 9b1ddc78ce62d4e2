"""``PackedGRU``: an ``nn.GRU`` on lstmopt's native kernel.

GRUs are as common as LSTMs on CPU (speech enhancement, wake words, recommenders), and PyTorch has no
oneDNN path for them: eager ``nn.GRU`` runs its own cell loop, a few ATen ops per step and layer. The
native kernel (``kernels/csrc/lstm.cpp``) runs the whole call, every layer, direction and step, in one
native call, for tensors and PackedSequences, with each step's gates in one pass over the weights.

No kernel gives eager's exact results (its cell loop sums in its own order), so a GRU is packed only
where approximate kernels are allowed (``optimize(exact=False)``, ``--approx``), and held to the
approximate-kernel contract (``kernels/accuracy.py``). Kernels (``lstmopt.kernels.table``, GRU):
``native``, and ``stock`` (nn.GRU itself). As ``PackedLSTM``: the parameters are the real dense weights
(same names, ``state_dict``, errors), the packs follow them (``load_state_dict``, ``.to()``,
reassignment, in-place edits), training, autograd, autocast and other dtypes take nn.GRU's own path, and
pickles and TorchScript archives store the dense weights and pack again where they are loaded.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
from typing import Optional, Tuple, overload

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.native import NativePacks, run_native_gru
from lstmopt.modules import dispatch
from lstmopt.modules.guards import inference_call, plain_state, valid_for_kernel, valid_sequence
from lstmopt.modules.pack_state import OneKernel, PackState
from lstmopt.modules.packs import native_obstacle as native_weights_obstacle, shallow_as, tracked_copy
from lstmopt.modules.scripted import ScriptedPaths

__all__ = ["GRU_KERNELS", "PackedGRU", "TracedGRU", "gru_obstacle", "gru_serves"]

GRU_KERNELS = kernel_table.names(kernel_table.GRU)

_stock = nn.GRU.forward


def gru_obstacle(gru: nn.Module) -> Optional[str]:
    """Why ``gru`` cannot run on the native kernel here, or None if it can."""
    if not isinstance(gru, nn.GRU):
        return f"{type(gru).__name__} is not an nn.GRU"
    computed = [name for name in gru._flat_weights_names if name not in gru._parameters]
    if computed:  # before the subclass check: a parametrization makes a subclass of its own
        return f"{computed[0]} is not a parameter (computed by a hook such as weight_norm)"
    if type(gru) is not nn.GRU and not isinstance(gru, PackedGRU):
        return f"{type(gru).__qualname__} subclasses nn.GRU; its own code would be bypassed"
    if gru.input_size == 0 or gru.hidden_size == 0:
        return "input_size or hidden_size is 0"
    return native_weights_obstacle([gru._parameters[name] for name in gru._flat_weights_names])


class PackedGRU(OneKernel, nn.GRU):
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

    KERNELS = GRU_KERNELS
    INPUTS = kernel_table.GRU
    kernel: str  # "native" or "stock" (lstmopt.kernels.table, GRU)
    # Present only while the native kernel is in use: a scripted GRU without it loads without the library.
    native_packs: NativePacks

    _weights_by_name = ScriptedPaths._weights_by_name  # the parameters by literal name, in nn.GRU's order

    def __init__(self, *args, kernel: str = "native", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_packing(kernel)

    @classmethod
    def from_gru(cls, gru: nn.GRU, kernel: str = "native") -> "PackedGRU":
        """A ``PackedGRU`` with a copy of ``gru``'s weights."""
        return cls.convert_(tracked_copy(gru), kernel)

    @classmethod
    def convert_(cls, gru: nn.GRU, kernel: str = "native") -> "PackedGRU":
        """Turn ``gru`` itself into a ``PackedGRU`` (its identity, hooks and sharing kept)."""
        if not isinstance(gru, nn.GRU):
            raise ValueError(f"cannot pack this GRU: {type(gru).__name__} is not an nn.GRU")
        return cls._become(gru, kernel)

    def _packed_names(self) -> list:
        return list(self._flat_weights_names)

    def _native_obstacle(self) -> Optional[str]:
        return gru_obstacle(self)

    def _new_native_packs(self, weights: list) -> NativePacks:
        return NativePacks([w.detach() for w in weights], self.hidden_size, self.num_layers, self.bidirectional,
                           self.bias, 0, True)

    def _weight_names(self):
        return getattr(self, "_flat_weights_names", ())

    @torch.jit.export
    def flatten_parameters(self) -> None:
        """nn.GRU's, a no-op on CPU; exported so that scripted wrappers may call it."""
        if not torch.jit.is_scripting():
            nn.GRU.flatten_parameters(self)

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]: ...

    def forward(self, input, hx=None):
        if not torch.jit.is_scripting():
            return _eager(self, input, hx)
        if isinstance(input, PackedSequence):
            return self._scripted_sequence(input, hx)
        else:
            return self._scripted_tensor(input, hx)

    # ---------------------------------------------------------------------------------------------
    # TorchScript: the same kernel behind the same checks, and nn.GRU.forward's two branches as fallback.

    def _kernel_allowed(self) -> bool:
        return self.kernel == "native" and inference_call(self.training)

    def _scripted_tensor(self, input: Tensor, hx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        weights = self._weights_by_name()
        states = self.num_layers * (2 if self.bidirectional else 1)
        if hasattr(self, "native_packs"):  # resolved when compiled: without it, no native op in the archive
            if (self._kernel_allowed() and valid_for_kernel(input, _pair(hx), torch.float32, self.input_size,
                                                            self.hidden_size, states, self.batch_first, False)
                    and self.native_packs.is_current(weights)):
                return run_native_gru(self.native_packs, input, None, hx, self.batch_first)
        # The tensor branch of nn.GRU.forward, on the given weights.
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        if hx is None:
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            hx = torch.zeros(states, max_batch_size, self.hidden_size, dtype=input.dtype, device=input.device)
        self.check_forward_args(input, hx, None)
        result = _VF.gru(input, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                         self.bidirectional, self.batch_first)
        output, hidden = result[0], result[1]
        if not is_batched:
            output, hidden = output.squeeze(batch_dim), hidden.squeeze(1)
        return output, hidden

    def _scripted_sequence(self, input: PackedSequence, hx: Optional[Tensor]) -> Tuple[PackedSequence, Tensor]:
        weights = self._weights_by_name()
        states = self.num_layers * (2 if self.bidirectional else 1)
        if hasattr(self, "native_packs"):
            if (self._kernel_allowed() and valid_sequence(input.data, input.batch_sizes, input.sorted_indices,
                                                          input.unsorted_indices, _pair(hx), torch.float32,
                                                          self.input_size, self.hidden_size, states)
                    and self.native_packs.is_current(weights)):
                sorted_hx = hx if hx is None else self.permute_hidden(hx, input.sorted_indices)
                output, h_n = run_native_gru(self.native_packs, input.data, input.batch_sizes, sorted_hx, False)
                return self._sequence_result(input, output, h_n)
        # The PackedSequence branch of nn.GRU.forward, on the given weights.
        data, batch_sizes = input.data, input.batch_sizes
        if hx is None:
            hx = torch.zeros(states, int(batch_sizes[0]), self.hidden_size, dtype=data.dtype, device=data.device)
        else:
            hx = self.permute_hidden(hx, input.sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        result = _VF.gru(data, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                         self.bidirectional)
        return self._sequence_result(input, result[0], result[1])

    def _sequence_result(self, input: PackedSequence, output: Tensor, h_n: Tensor) -> Tuple[PackedSequence, Tensor]:
        """Output rows packed as the input's, the state in the caller's order, as nn.GRU gives them."""
        return (PackedSequence(output, input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                self.permute_hidden(h_n, input.unsorted_indices))

    @torch.jit.unused  # Python only: a scripted module never asks
    def serves(self, input, hx) -> bool:
        """Whether the kernel in use takes this call itself rather than nn.GRU's path (autotune asks). Python only."""
        return self.kernel == "stock" or (self.uses_native_kernel and gru_serves(self, input, hx))

    def scripted_for_trace(self) -> torch.jit.ScriptModule:
        """A scripted copy with one tensor forward (``TracedGRU``) on the same parameters, for a traced caller."""
        return torch.jit.script(shallow_as(TracedGRU, tracked_copy(self)))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"


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


def gru_serves(gru: PackedGRU, input, hx) -> bool:
    """Whether the native kernel takes this call itself (the rest takes nn.GRU's path). Python only."""
    if not (hx is None or type(hx) is Tensor) or not plain_state(_pair(hx)):
        return False
    states = gru.num_layers * (2 if gru.bidirectional else 1)
    if type(input) is PackedSequence:
        return type(input.data) is Tensor and valid_sequence(
            input.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices, _pair(hx), torch.float32,
            gru.input_size, gru.hidden_size, states)
    return type(input) is Tensor and valid_for_kernel(input, _pair(hx), torch.float32, gru.input_size,
                                                      gru.hidden_size, states, gru.batch_first, False)


def _pair(hx: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """A GRU's state as the guards take an LSTM's (h, c): both checked for the same shape."""
    if hx is None:
        return None
    return (hx, hx)


# ---------------------------------------------------------------------------------------------------
# Eager: the native kernel's own checks first (nanoseconds), then Python's, then nn.GRU's own path.

def _eager(gru: PackedGRU, input, hx):
    if torch.compiler.is_exporting():
        return _exported(gru, input, hx)
    if torch.compiler.is_compiling() or dispatch.stock_only(gru):
        return _stock(gru, input, hx)
    packs = gru._state.native
    if packs is not None and type(input) is Tensor:
        result = packs.try_gru(input, hx, gru.batch_first, gru._parameters)
        if result is not None:
            return result
    return dispatch.seqlocked(gru, _once, input, hx)


def _exported(gru: PackedGRU, input, hx):
    """nn.GRU's graph, or under ``dispatch.recording_dense_ops`` lstmopt's dense op for a native-kernel
    GRU's tensor calls (torch.export passes fake tensors: subclasses)."""
    weights = gru._weights_by_name()
    if (dispatch.records_dense_ops() and gru.kernel == "native" and not gru.training and isinstance(input, Tensor)
            and (hx is None or isinstance(hx, Tensor)) and plain_state(_pair(hx), False)
            and all(w.dtype == torch.float32 for w in weights)
            and valid_for_kernel(input, _pair(hx), torch.float32, gru.input_size, gru.hidden_size,
                                 gru.num_layers * (2 if gru.bidirectional else 1), gru.batch_first, False)):
        return tuple(torch.ops.lstmopt.gru_dense(input, hx, weights, gru.hidden_size, gru.num_layers,
                                                 gru.bidirectional, gru.batch_first, gru.bias))
    return _stock(gru, input, hx)


def _once(gru: PackedGRU, state: PackState, input, hx):
    if state.native is None or not gru_serves(gru, input, hx):
        return _stock(gru, input, hx)
    # Served by the kernel, whose packs may be stale after an in-place edit: repack first.
    if not state.ready(gru, lambda: state.native is not None):
        return _stock(gru, input, hx)
    packs = state.native
    if packs is None:  # dropped meanwhile (other weights: another thread repacked)
        return _stock(gru, input, hx)
    if type(input) is PackedSequence:
        sorted_hx = hx if hx is None else gru.permute_hidden(hx, input.sorted_indices)
        output, h_n, _ = packs.forward(input.data, input.batch_sizes, sorted_hx, None, False)
        return gru._sequence_result(input, output, h_n)
    output, h_n, _ = packs.forward(input, None, hx, None, gru.batch_first)
    return output, h_n
