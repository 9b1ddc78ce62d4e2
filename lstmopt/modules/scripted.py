"""The TorchScript mirror of ``PackedLSTM``'s dispatch: what a scripted (or loaded) ``PackedLSTM`` runs.

The Python dispatch (``modules/lstm.py``) cannot be scripted: it reads data pointers, holds a lock and calls
``super().forward``. ``ScriptedPaths`` is its scripted counterpart: the same guard and kernels
(``_scripted_tensor``, ``_scripted_sequence``), the two branches of nn.LSTM.forward on given weights as the
fallback, and ``_weights_by_name``, which reads the parameters by their literal names. That matters after
``torch.jit.load``: a loaded archive gives each reference to a tensor its own version counter, so only the
parameters themselves see the in-place copy of a ``load_state_dict``.
"""

import linecache
from typing import List, Optional, Tuple

import torch
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels.aten import LayerArgs, run_cells, run_onednn, run_onednn_sequence
from lstmopt.kernels.native import NativePacks, run_native
from lstmopt.modules.guards import inference_call, valid_for_kernel, valid_sequence

__all__ = ["MAX_SCRIPTED_LAYERS", "ScriptedPaths"]

MAX_SCRIPTED_LAYERS = 32
"""Layers whose parameters ``_weights_by_name`` can read (its source is unrolled, one name at a time)."""


def _weights_by_name_source() -> str:
    """``def _weights_by_name(self)``: the parameters in nn.LSTM's flat order, each read by its literal name.
    TorchScript resolves ``hasattr(self, "literal")`` when it compiles, so only existing names are read."""
    lines = ["def _weights_by_name(self) -> List[Tensor]:", "    weights: List[Tensor] = []"]
    for layer in range(MAX_SCRIPTED_LAYERS):
        for suffix in ("", "_reverse"):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                name = f"{kind}_l{layer}{suffix}"
                lines += [f"    if hasattr(self, {name!r}):", f"        weights.append(self.{name})"]
    lines.append("    return weights")
    return "\n".join(lines) + "\n"


def _compile_weights_by_name():
    # TorchScript compiles from source (inspect.getsource): register the generated text with linecache.
    source = _weights_by_name_source()
    filename = "<lstmopt.modules.scripted._weights_by_name>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"List": List, "Tensor": Tensor}
    exec(compile(source, filename, "exec"), namespace)
    function = namespace["_weights_by_name"]
    function.__module__ = __name__
    return function


class ScriptedPaths:
    """Mixed into ``PackedLSTM``; only its scripted forward calls these."""

    _weights_by_name = _compile_weights_by_name()

    # The scripted forward reads the parameters by name, never through _flat_weights: torch.jit.freeze
    # refuses a module whose forward reads two attributes that share memory.

    def _scripted_repack(self) -> None:
        weights = self._weights_by_name()
        per_layer = len(weights) // len(self.packed_layers)
        for i, layer in enumerate(self.packed_layers):
            if layer.packs is not None:
                layer.pack(weights[i * per_layer].detach(), weights[i * per_layer + 1].detach(),
                           self._scripted_bias(weights, i * per_layer + 2), self._scripted_bias(weights, i * per_layer + 3))
        if hasattr(self, "native_packs"):
            self.native_packs = NativePacks([w.detach() for w in weights], self.hidden_size, self.num_layers,
                                            self.bidirectional, self.bias, self.proj_size, "lstm", self.native_weights)

    def _casts_at_boundary(self, dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
        """Whether a call in ``dtype`` is cast to the weights' dtype and back (``io_dtype``, eager too)."""
        io_dtype = self.io_dtype
        if io_dtype is None:
            return False
        return dtype == io_dtype and io_dtype != weight_dtype

    def _sequence_result(self, input: PackedSequence, output: Tensor, h_n: Tensor, c_n: Tensor
                         ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        """A sequence kernel's result as nn.LSTM gives it: output rows packed as the input's, states in the
        caller's order (eager too)."""
        return (PackedSequence(output, input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                self.permute_hidden((h_n, c_n), input.unsorted_indices))

    def _scripted_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        weights = self._weights_by_name()
        weight_dtype = weights[0].dtype
        if self._casts_at_boundary(input.dtype, weight_dtype):
            output, hidden = self._scripted_forward_tensor(input.to(weight_dtype), _cast_hidden(hx, weight_dtype),
                                                           weights)
            return output.to(input.dtype), (hidden[0].to(input.dtype), hidden[1].to(input.dtype))
        return self._scripted_forward_tensor(input, hx, weights)

    def _scripted_sequence(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        weights = self._weights_by_name()
        weight_dtype = weights[0].dtype
        data = input.data
        if self._casts_at_boundary(data.dtype, weight_dtype):
            cast = PackedSequence(data.to(weight_dtype), input.batch_sizes, input.sorted_indices,
                                  input.unsorted_indices)
            out, hidden = self._scripted_forward_sequence(cast, _cast_hidden(hx, weight_dtype), weights)
            out = PackedSequence(out.data.to(data.dtype), out.batch_sizes, out.sorted_indices,
                                 out.unsorted_indices)
            return out, (hidden[0].to(data.dtype), hidden[1].to(data.dtype))
        return self._scripted_forward_sequence(input, hx, weights)

    def _scripted_forward_sequence(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        if (
            self.sequence_dtype is not None
            and inference_call(self.training)
            and valid_sequence(input.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices, hx,
                               self.sequence_dtype, self.input_size, self.hidden_size,
                               self.num_layers * (2 if self.bidirectional else 1), self.proj_size)
        ):
            sorted_hx = hx
            if hx is not None:
                sorted_hx = self.permute_hidden(hx, input.sorted_indices)
            if hasattr(self, "native_packs"):
                if self.sequence_kernel == "native" and self.native_packs.is_current(weights):
                    output, h_n, c_n = run_native(self.native_packs, input.data, input.batch_sizes, sorted_hx, False)
                    return self._sequence_result(input, output, h_n, c_n)
            if self.sequence_kernel == "onednn" and self._scripted_packs_current(weights):
                output, h_n, c_n = run_onednn_sequence(input.data, input.batch_sizes, sorted_hx,
                                                       self._scripted_layers(), self.hidden_size, self.bidirectional,
                                                       self.bias)
                return self._sequence_result(input, output, h_n, c_n)
        return self._stock_packed_sequence(input, hx, weights)

    def _scripted_layers(self) -> List[LayerArgs]:
        layers: List[LayerArgs] = []
        for layer in self.packed_layers:
            packs = layer.packs
            assert packs is not None  # _scripted_packs_current checked it
            layers.append((packs.packed_ih, packs.packed_hh, packs.bias_ih, packs.bias_hh, layer.reverse))
        return layers

    def _scripted_bias(self, weights: List[Tensor], index: int) -> Tensor:
        return weights[index].detach() if self.bias else torch.empty(0, dtype=weights[0].dtype)

    def _scripted_packs_current(self, weights: List[Tensor]) -> bool:
        per_layer = len(weights) // len(self.packed_layers)
        for i, layer in enumerate(self.packed_layers):
            first = i * per_layer
            if not layer.is_current([weights[first], weights[first + 1], self._scripted_bias(weights, first + 2),
                                     self._scripted_bias(weights, first + 3)]):
                return False
        return True

    def _scripted_forward_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if (
            inference_call(self.training)
            and valid_for_kernel(input, hx, self.kernel_dtype, self.input_size, self.hidden_size,
                                 self.num_layers * (2 if self.bidirectional else 1), self.batch_first,
                                 self.kernel == "cell", self.proj_size)
        ):
            if hasattr(self, "native_packs"):
                if self.kernel == "native" and self.native_packs.is_current(weights):
                    output, h_n, c_n = run_native(self.native_packs, input, None, hx, self.batch_first)
                    return output, (h_n, c_n)
            if self.kernel == "onednn" and self._scripted_packs_current(weights):
                return run_onednn(input, hx, self._scripted_layers(), self.hidden_size, self.bidirectional,
                                  self.batch_first, self.bias)
            if self.kernel == "cell":
                return run_cells(input, hx, weights, self.input_size, self.hidden_size, self.num_layers,
                                 self.bidirectional, self.batch_first, self.bias)
        return self._stock_tensor(input, hx, weights)

    def _state_size(self) -> int:
        """The hidden state's size: proj_size in an LSTMP, else hidden_size (the cell state's)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _stock_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # The tensor branch of nn.LSTM.forward, on the given weights.
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            states = self.num_layers * (2 if self.bidirectional else 1)
            hx = (torch.zeros(states, max_batch_size, self._state_size(), dtype=input.dtype, device=input.device),
                  torch.zeros(states, max_batch_size, self.hidden_size, dtype=input.dtype, device=input.device))
        else:
            if is_batched:
                if hx[0].dim() != 3 or hx[1].dim() != 3:
                    raise RuntimeError(
                        f"For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            else:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        # Scripted nn.LSTM skips check_input's dtype check: an input of another dtype reaches the op, which
        # raises its own RuntimeError (it takes every dtype without crashing). So does this path, so callers
        # of a scripted model catch what they would catch with scripted nn.LSTM.
        self.check_forward_args(input, hx, None)
        result = _VF.lstm(input, hx, weights, self.bias, self.num_layers, self.dropout,
                          self.training, self.bidirectional, self.batch_first)
        output = result[0]
        hidden = (result[1], result[2])
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _stock_packed_sequence(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        # The PackedSequence branch of nn.LSTM.forward, on the given weights.
        data = input.data
        batch_sizes = input.batch_sizes
        if hx is None:
            states, batch = self.num_layers * (2 if self.bidirectional else 1), int(batch_sizes[0])
            hx = (torch.zeros(states, batch, self._state_size(), dtype=data.dtype, device=data.device),
                  torch.zeros(states, batch, self.hidden_size, dtype=data.dtype, device=data.device))
        else:
            hx = self.permute_hidden(hx, input.sorted_indices)
        result = _VF.lstm(data, batch_sizes, hx, weights, self.bias, self.num_layers,
                          self.dropout, self.training, self.bidirectional)
        output = PackedSequence(result[0], batch_sizes, input.sorted_indices, input.unsorted_indices)
        return output, self.permute_hidden((result[1], result[2]), input.unsorted_indices)


def _cast_hidden(
    hx: Optional[Tuple[Tensor, Tensor]], dtype: torch.dtype
) -> Optional[Tuple[Tensor, Tensor]]:
    if hx is None:
        return None
    return (hx[0].to(dtype), hx[1].to(dtype))
