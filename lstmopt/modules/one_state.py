"""What ``PackedGRU`` and ``PackedRNN`` share: a multi-layer recurrent module with one state, h, on lstmopt's
native kernel.

nn.GRU and nn.RNN have the same call (``input``, ``hx`` -> ``output``, ``h_n``) and neither has a oneDNN path
in PyTorch: eager runs its own cell loop, a few ATen ops per step and layer. The native kernel
(``kernels/csrc/lstm.cpp``) runs the whole call, every layer, direction and step, in one native call, for
tensors and PackedSequences. No kernel gives eager's exact results (its cell loop sums in its own order), so
these modules are packed only where approximate kernels are allowed (``optimize(exact=False)``,
``--approx``), and held to the approximate-kernel contract (``kernels/accuracy.py``).

As ``PackedLSTM``: the parameters are the real dense weights (same names, ``state_dict``, errors), the packs
follow them (``load_state_dict``, ``.to()``, reassignment, in-place edits), training, autograd, autocast and
other dtypes take the torch module's own path, and pickles and TorchScript archives store the dense weights and
pack again where they are loaded.

A kind names its torch class (``TORCH_CLASS``), its cell (``_cell``: what ``NativePacks`` packs), its native
op (``_native_call``) and its torch fallback (``_stock_tensor_call``, ``_stock_sequence_call``), and declares
its own overloaded ``forward`` (TorchScript finds overloads only on the class that declares them).
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels.native import NativePacks
from lstmopt.modules import dispatch
from lstmopt.modules.guards import inference_call, plain_state, valid_for_kernel, valid_sequence
from lstmopt.modules.pack_state import OneKernel, PackState
from lstmopt.modules.packs import native_obstacle as native_weights_obstacle, shallow_as, tracked_copy
from lstmopt.modules.scripted import ScriptedPaths

__all__ = ["PackedOneState", "one_state_obstacle"]


def one_state_obstacle(module: nn.Module, torch_class: type) -> Optional[str]:
    """Why ``module`` (an ``nn.GRU`` or ``nn.RNN``, ``torch_class``) cannot run on the native kernel here, or None."""
    name = torch_class.__name__
    if not isinstance(module, torch_class):
        return f"{type(module).__name__} is not an nn.{name}"
    computed = [n for n in module._flat_weights_names if n not in module._parameters]
    if computed:  # before the subclass check: a parametrization makes a subclass of its own
        return f"{computed[0]} is not a parameter (computed by a hook such as weight_norm)"
    if type(module) is not torch_class and not isinstance(module, PackedOneState):
        return f"{type(module).__qualname__} subclasses nn.{name}; its own code would be bypassed"
    if module.input_size == 0 or module.hidden_size == 0:
        return "input_size or hidden_size is 0"
    return native_weights_obstacle([module._parameters[n] for n in module._flat_weights_names])


class PackedOneState(OneKernel):
    """The shared half of ``PackedGRU`` and ``PackedRNN`` (see the module docstring)."""

    TORCH_CLASS: type = nn.Module  # nn.GRU or nn.RNN
    kernel: str  # "native" or "stock" (lstmopt.kernels.table)
    # Present only while the native kernel is in use: a scripted module without it loads without the library.
    native_packs: NativePacks

    _weights_by_name = ScriptedPaths._weights_by_name  # the parameters by literal name, in the flat order

    def __init__(self, *args, kernel: str = "native", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_packing(kernel)

    @classmethod
    def convert_(cls, module: nn.Module, kernel: str = "native"):
        """Turn ``module`` itself into this packed class (its identity, hooks and sharing kept)."""
        if not isinstance(module, cls.TORCH_CLASS):
            name = cls.TORCH_CLASS.__name__
            raise ValueError(f"cannot pack this {name}: {type(module).__name__} is not an nn.{name}")
        return cls._become(module, kernel)

    def _packed_names(self) -> list:
        return list(self._flat_weights_names)

    def _native_obstacle(self) -> Optional[str]:
        return one_state_obstacle(self, self.TORCH_CLASS)

    def _cell(self) -> str:
        raise NotImplementedError  # each kind's NativePacks.cell

    def _new_native_packs(self, weights: list) -> NativePacks:
        return NativePacks([w.detach() for w in weights], self.hidden_size, self.num_layers, self.bidirectional,
                           self.bias, 0, self._cell())

    def _weight_names(self):
        return getattr(self, "_flat_weights_names", ())

    @torch.jit.export
    def flatten_parameters(self) -> None:
        """The torch module's, a no-op on CPU; exported so that scripted wrappers may call it."""
        if not torch.jit.is_scripting():
            nn.RNNBase.flatten_parameters(self)

    # ---------------------------------------------------------------------------------------------
    # TorchScript: the same kernel behind the same checks, and the torch forward's two branches as fallback.

    def _kernel_allowed(self) -> bool:
        return self.kernel == "native" and inference_call(self.training)

    def _scripted_tensor(self, input: Tensor, hx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        weights = self._weights_by_name()
        states = self.num_layers * (2 if self.bidirectional else 1)
        if hasattr(self, "native_packs"):  # resolved when compiled: without it, no native op in the archive
            if (self._kernel_allowed() and valid_for_kernel(input, _pair(hx), torch.float32, self.input_size,
                                                            self.hidden_size, states, self.batch_first, False)
                    and self.native_packs.is_current(weights)):
                return self._native_call(self.native_packs, input, None, hx, self.batch_first)
        # The tensor branch of the torch module's forward, on the given weights.
        if input.dim() not in (2, 3):
            raise ValueError(self._rank_error(input.dim()))
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
        output, hidden = self._stock_tensor_call(input, hx, weights)
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
                output, h_n = self._native_call(self.native_packs, input.data, input.batch_sizes, sorted_hx, False)
                return self._sequence_result(input, output, h_n)
        # The PackedSequence branch of the torch module's forward, on the given weights.
        data, batch_sizes = input.data, input.batch_sizes
        if hx is None:
            hx = torch.zeros(states, int(batch_sizes[0]), self.hidden_size, dtype=data.dtype, device=data.device)
        else:
            hx = self.permute_hidden(hx, input.sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        output, hidden = self._stock_sequence_call(data, batch_sizes, hx, weights)
        return self._sequence_result(input, output, hidden)

    def _sequence_result(self, input: PackedSequence, output: Tensor, h_n: Tensor) -> Tuple[PackedSequence, Tensor]:
        """Output rows packed as the input's, the state in the caller's order, as the torch module gives them."""
        return (PackedSequence(output, input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                self.permute_hidden(h_n, input.unsorted_indices))

    @torch.jit.unused  # Python only: a scripted module never asks
    def serves(self, input, hx) -> bool:
        """Whether the kernel in use takes this call itself rather than the torch module's path (autotune asks)."""
        return self.kernel == "stock" or (self.uses_native_kernel and one_state_serves(self, input, hx))

    def scripted_for_trace(self) -> torch.jit.ScriptModule:
        """A scripted copy with one tensor forward (the kind's ``TRACED`` class) on the same parameters, for a
        traced caller."""
        return torch.jit.script(shallow_as(self.TRACED, tracked_copy(self)))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"


def one_state_serves(module: PackedOneState, input, hx) -> bool:
    """Whether the native kernel takes this call itself (the rest takes the torch module's path). Python only."""
    if not (hx is None or type(hx) is Tensor) or not plain_state(_pair(hx)):
        return False
    states = module.num_layers * (2 if module.bidirectional else 1)
    if type(input) is PackedSequence:
        return type(input.data) is Tensor and valid_sequence(
            input.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices, _pair(hx), torch.float32,
            module.input_size, module.hidden_size, states)
    return type(input) is Tensor and valid_for_kernel(input, _pair(hx), torch.float32, module.input_size,
                                                      module.hidden_size, states, module.batch_first, False)


def _pair(hx: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """The one state as the guards take an LSTM's (h, c): both checked for the same shape."""
    if hx is None:
        return None
    return (hx, hx)


# ---------------------------------------------------------------------------------------------------
# Eager: the native kernel's own checks first (nanoseconds), then Python's, then the torch module's path.

def stock(module: PackedOneState, input, hx):
    """The torch module's own forward (nn.GRU's, nn.RNN's): every call the native kernel does not take."""
    return module.TORCH_CLASS.forward(module, input, hx)


def eager(module: PackedOneState, input, hx):
    if torch.compiler.is_exporting():
        return _exported(module, input, hx)
    if torch.compiler.is_compiling() or dispatch.stock_only(module):
        return stock(module, input, hx)
    packs = module._state.native
    if packs is not None and type(input) is Tensor:
        result = packs.try_one_state(input, hx, module.batch_first, module._parameters)
        if result is not None:
            return result
    return dispatch.seqlocked(module, _once, input, hx)


def _exported(module: PackedOneState, input, hx):
    """The torch module's graph, or under ``dispatch.recording_dense_ops`` lstmopt's dense op (the kind's
    ``_dense_call``) for a native-kernel module's tensor calls (torch.export passes fake tensors: subclasses)."""
    weights = module._weights_by_name()
    if (dispatch.records_dense_ops() and module.kernel == "native" and not module.training
            and isinstance(input, Tensor) and (hx is None or isinstance(hx, Tensor))
            and plain_state(_pair(hx), False) and all(w.dtype == torch.float32 for w in weights)
            and valid_for_kernel(input, _pair(hx), torch.float32, module.input_size, module.hidden_size,
                                 module.num_layers * (2 if module.bidirectional else 1), module.batch_first, False)):
        return module._dense_call(input, hx, weights)
    return stock(module, input, hx)


def _once(module: PackedOneState, state: PackState, input, hx):
    if state.native is None or not one_state_serves(module, input, hx):
        return stock(module, input, hx)
    # Served by the kernel, whose packs may be stale after an in-place edit: repack first.
    if not state.ready(module, lambda: state.native is not None):
        return stock(module, input, hx)
    packs = state.native
    if packs is None:  # dropped meanwhile (other weights: another thread repacked)
        return stock(module, input, hx)
    if type(input) is PackedSequence:
        sorted_hx = hx if hx is None else module.permute_hidden(hx, input.sorted_indices)
        output, h_n, _ = packs.forward(input.data, input.batch_sizes, sorted_hx, None, False)
        return module._sequence_result(input, output, h_n)
    output, h_n, _ = packs.forward(input, None, hx, None, module.batch_first)
    return output, h_n
