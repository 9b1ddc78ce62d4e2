"""The computations a ``PackedLSTM`` call can run, as TorchScript-compatible functions.

- ``run_onednn``: one ``aten.mkldnn_rnn_layer`` per layer and direction, the decomposition inductor uses
  (PR #103071). On packed weights it is the fast kernel (bit-identical to nn.LSTM); on dense weights it
  is the graph ``torch.export`` records (the op reorders them itself, as eager does).
- ``run_cells``: a single time step as one ``aten.lstm_cell`` per layer and direction: no primitive to
  set up, so at one step it beats the op's fixed cost; not bit-identical (the approximate-kernel contract, kernels/accuracy.py).

Both trust their arguments completely: callers check them first (see ``lstmopt.checks``).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["LayerArgs", "run_cells", "run_onednn", "run_onednn_sequence"]

LayerArgs = Tuple[Tensor, Tensor, Tensor, Tensor, bool]
"""(weight_ih, weight_hh, bias_ih, bias_hh, reverse) of one layer and direction, packed or dense."""


def run_onednn(
    input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], layers: List[LayerArgs], hidden_size: int,
    bidirectional: bool, batch_first: bool, has_biases: bool, zeros: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """nn.LSTM's computation, layer by layer. ``zeros``: a (1, B, H) zero state to reuse (the op only
    reads its state inputs); made here when None."""
    batched = input.dim() == 3
    # The op reads dim 0 as time and trusts the memory to be dense: give it exactly that.
    if batched:
        x = (input.transpose(0, 1) if batch_first else input).contiguous()
    else:
        x = input.unsqueeze(1).contiguous()
    count = len(layers)
    # States go in as (1, B, H) so the op's (1, B, H) results need no reshaping.
    if hx is None:
        if zeros is None:
            zeros = torch.zeros(1, x.size(1), hidden_size, dtype=x.dtype, device=x.device)
        h0 = [zeros] * count
        c0 = h0
    else:
        h, c = hx
        if not batched:
            h = h.unsqueeze(1)
            c = c.unsqueeze(1)
        h0 = h.contiguous().split(1)
        c0 = c.contiguous().split(1)

    if count == 1:  # the common case, without the bookkeeping of the layer loop
        w_ih, w_hh, b_ih, b_hh, reverse = layers[0]
        out = torch.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0[0], c0[0], reverse, [], 2, hidden_size, 1,
                                     has_biases, False, False, False)
        x, h_n, c_n = out[0], out[1], out[2]
    else:
        hs: List[Tensor] = []
        cs: List[Tensor] = []
        directions = 2 if bidirectional else 1
        for first in range(0, count, directions):
            outs: List[Tensor] = []
            for i in range(first, first + directions):
                w_ih, w_hh, b_ih, b_hh, reverse = layers[i]
                # mode 2 is ideep::rnn_kind::LSTM; one layer, one direction, time-major, inference.
                out = torch.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0[i], c0[i], reverse, [], 2, hidden_size,
                                             1, has_biases, False, False, False)
                outs.append(out[0])
                hs.append(out[1])
                cs.append(out[2])
            x = outs[0] if directions == 1 else torch.cat(outs, 2)
        h_n = torch.cat(hs, 0)
        c_n = torch.cat(cs, 0)

    if not batched:
        return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return (x.transpose(0, 1) if batch_first else x), (h_n, c_n)


def run_cells(
    input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor], input_size: int, hidden_size: int,
    num_layers: int, bidirectional: bool, batch_first: bool, has_biases: bool, zeros: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One time step through ``aten.lstm_cell`` per layer and direction, on the dense weights in
    nn.LSTM's flat order. ``zeros``: a (B, H) zero state to reuse; made here when None."""
    batched = input.dim() == 3
    x = input.reshape(-1, input_size)  # (B, I): the one time step
    batch = x.size(0)
    states = num_layers * (2 if bidirectional else 1)
    if hx is None:
        if zeros is None:
            zeros = torch.zeros(batch, hidden_size, dtype=x.dtype, device=x.device)
        h0 = [zeros] * states
        c0 = h0
    else:
        h0 = hx[0].reshape(states, batch, hidden_size).unbind(0)
        c0 = hx[1].reshape(states, batch, hidden_size).unbind(0)
    per_layer = len(weights) // states
    hs: List[Tensor] = []
    cs: List[Tensor] = []
    forward_h = x
    layer_input = x
    for i in range(states):
        w = weights[i * per_layer:(i + 1) * per_layer]
        b_ih: Optional[Tensor] = w[2] if has_biases else None
        b_hh: Optional[Tensor] = w[3] if has_biases else None
        h, c = torch.lstm_cell(layer_input, [h0[i], c0[i]], w[0], w[1], b_ih, b_hh)
        hs.append(h)
        cs.append(c)
        if not bidirectional:
            layer_input = h
        elif i % 2 == 0:
            forward_h = h
        else:
            layer_input = torch.cat([forward_h, h], 1)
    # unsqueeze is a view; stack would copy (a measurable cost at this size)
    h_n = hs[0].unsqueeze(0) if states == 1 else torch.stack(hs, 0)
    c_n = cs[0].unsqueeze(0) if states == 1 else torch.stack(cs, 0)
    if not batched:
        return layer_input, (h_n.squeeze(1), c_n.squeeze(1))
    return layer_input.unsqueeze(1 if batch_first else 0), (h_n, c_n)


def run_onednn_sequence(
    data: Tensor, batch_sizes: Tensor, hx: Optional[Tuple[Tensor, Tensor]], layers: List[LayerArgs],
    hidden_size: int, bidirectional: bool, has_biases: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """nn.LSTM's computation on a PackedSequence's ``data`` and ``batch_sizes`` (sequences sorted longest
    first; ``hx`` in that order), through the oneDNN op instead of ATen's cell loop. Returns the output's
    packed data, h_n and c_n (sorted order). Not bit-identical (kernels/accuracy.py) (eager runs packed
    sequences through another kernel).

    Each direction runs on a padded copy of the batch, one op call per run of steps over which the same
    sequences are active: forward on sequences aligned at their start, so the steps beyond a sequence's
    end come after it; reverse on sequences aligned at their end, so the op, running backwards, meets a
    sequence's last step first. A sequence's final state is the op's state where its run ends."""
    sizes: List[int] = batch_sizes.tolist()
    steps, batch = len(sizes), sizes[0]
    rows = data.size(0)
    step_of_row = torch.repeat_interleave(torch.arange(steps), batch_sizes)
    step_start = torch.cumsum(batch_sizes, 0) - batch_sizes
    seq_of_row = torch.arange(rows) - step_start[step_of_row]
    lengths = (batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)
    # Where each packed row sits in a (steps * batch) padded layout, aligned at the start or at the end.
    at_start = step_of_row * batch + seq_of_row
    at_end = (step_of_row + steps - lengths[seq_of_row]) * batch + seq_of_row
    # Runs of steps with the same active sequences: [first, last) with `sizes[first]` sequences.
    bounds: List[int] = [0]
    for t in range(1, steps):
        if sizes[t] != sizes[t - 1]:
            bounds.append(t)
    bounds.append(steps)

    directions = 2 if bidirectional else 1
    states = len(layers)
    if hx is None:
        zeros = torch.zeros(1, batch, hidden_size, dtype=data.dtype)
        h0 = [zeros] * states
        c0 = h0
    else:
        h0 = hx[0].contiguous().split(1)
        c0 = hx[1].contiguous().split(1)
    h_n = torch.empty(states, batch, hidden_size, dtype=data.dtype)
    c_n = torch.empty(states, batch, hidden_size, dtype=data.dtype)
    x = data
    for first in range(0, states, directions):
        outs: List[Tensor] = []
        for i in range(first, first + directions):
            w_ih, w_hh, b_ih, b_hh, reverse = layers[i]
            index = at_end if reverse else at_start
            padded = x.new_zeros(steps * batch, x.size(1)).index_copy_(0, index, x).view(steps, batch, x.size(1))
            out = x.new_zeros(steps, batch, hidden_size)
            h, c = h0[i], c0[i]
            for r in range(len(bounds) - 1):
                start, end = bounds[r], bounds[r + 1]
                active = sizes[start]
                done = sizes[end] if end < steps else 0  # the sequences still going after this run
                # Reverse runs backwards through the end-aligned copy: its step `start` is position steps-1-start.
                lo, hi = (steps - end, steps - start) if reverse else (start, end)
                y, hy, cy, _ = torch.mkldnn_rnn_layer(
                    padded[lo:hi, :active].contiguous(), w_ih, w_hh, b_ih, b_hh, h[:, :active].contiguous(),
                    c[:, :active].contiguous(), reverse, [], 2, hidden_size, 1, has_biases, False, False, False)
                out[lo:hi, :active] = y
                h_n[i, done:active] = hy[0, done:active]
                c_n[i, done:active] = cy[0, done:active]
                h, c = hy, cy
            outs.append(out.view(steps * batch, hidden_size).index_select(0, index))
        x = outs[0] if directions == 1 else torch.cat(outs, 1)
    return x, h_n, c_n
