"""What a scripted ``PackedLSTM`` runs where Python code would do something TorchScript cannot.

TorchScript cannot call ``super().forward`` (nn.LSTM's own path), nor read an attribute by a computed name.
``ScriptedPaths`` supplies both: the two branches of nn.LSTM.forward (tensor and PackedSequence) on given
weights, and ``_weights_by_name``, which reads the parameters by their literal names. That matters after
``torch.jit.load``: a loaded archive gives each reference to a tensor its own version counter, so only the
parameters themselves see the in-place copy of a ``load_state_dict``.
"""

import linecache
from typing import List, Optional, Tuple

import torch
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence

__all__ = ["MAX_SCRIPTED_LAYERS", "ScriptedPaths"]

MAX_SCRIPTED_LAYERS = 32
"""Layers whose parameters ``_weights_by_name`` can read (its source is unrolled, one name at a time)."""


def _weights_by_name_source() -> str:
    """``def _weights_by_name(self)``: the parameters in nn.LSTM's flat order, each read by its literal name.
    TorchScript resolves ``hasattr(self, "literal")`` when it compiles, so only existing names are read."""
    lines = ["def _weights_by_name(self) -> List[Tensor]:", "    weights: List[Tensor] = []"]
    for layer in range(MAX_SCRIPTED_LAYERS):
        for suffix in ("", "_reverse"):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
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

    def _stock_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # The tensor branch of nn.LSTM.forward (proj_size is always 0 here), on the given weights.
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            num_directions = 2 if self.bidirectional else 1
            zeros = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
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
            num_directions = 2 if self.bidirectional else 1
            zeros = torch.zeros(self.num_layers * num_directions, int(batch_sizes[0]), self.hidden_size,
                                dtype=data.dtype, device=data.device)
            hx = (zeros, zeros)
        else:
            hx = self.permute_hidden(hx, input.sorted_indices)
        result = _VF.lstm(data, batch_sizes, hx, weights, self.bias, self.num_layers,
                          self.dropout, self.training, self.bidirectional)
        output = PackedSequence(result[0], batch_sizes, input.sorted_indices, input.unsorted_indices)
        return output, self.permute_hidden((result[1], result[2]), input.unsorted_indices)
