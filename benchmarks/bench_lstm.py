"""Eager nn.LSTM vs PackedLSTM vs the bare op on the same packed weights, measured side by side.

    python benchmarks/bench_lstm.py [--rounds 21] [--threads N] [--markdown]

Prints median latency per call and the ratios: speedup of the module and of the bare op over eager, and
the module's overhead over the bare op (the cost of lstmopt's own Python: validation, states, dispatch).
"""

import argparse
import sys

import torch
from torch import nn

from lstmopt import PackedLSTM
from lstmopt.timing import interleaved_medians

# (input_size, hidden_size, layers, bidirectional, batch, steps)
CONFIGS = [
    (40, 128, 1, False, 1, 1),
    (80, 256, 2, False, 1, 16),
    (128, 256, 2, True, 8, 50),
    (256, 512, 2, False, 16, 100),
]


def bare_op(packed: PackedLSTM, x: torch.Tensor):
    """The floor: the op per layer and direction on pre-laid-out input, no checks, states preallocated."""
    zeros = torch.zeros(x.size(1), packed.hidden_size)
    layers = list(packed.packed_layers)
    args = [(l.packed_ih, l.packed_hh, l.bias_ih, l.bias_hh, l.reverse) for l in layers]
    H, bias, bidirectional = packed.hidden_size, packed.bias, packed.bidirectional

    def run():
        inp = x
        for i in range(0, len(args), 2 if bidirectional else 1):
            w_ih, w_hh, b_ih, b_hh, rev = args[i]
            y = torch.mkldnn_rnn_layer(inp, w_ih, w_hh, b_ih, b_hh, zeros, zeros, rev, [], 2, H, 1, bias,
                                       False, False, False)[0]
            if bidirectional:
                w_ih, w_hh, b_ih, b_hh, rev = args[i + 1]
                y_r = torch.mkldnn_rnn_layer(inp, w_ih, w_hh, b_ih, b_hh, zeros, zeros, rev, [], 2, H, 1, bias,
                                             False, False, False)[0]
                y = torch.cat([y, y_r], 2)
            inp = y
        return inp

    return run


def measure(config, rounds):
    I, H, layers, bidirectional, B, T = config
    torch.manual_seed(0)
    eager = nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional).eval()
    packed = PackedLSTM.from_lstm(eager).eval()
    x = torch.randn(T, B, I)
    with torch.no_grad():
        assert torch.equal(eager(x)[0], packed(x)[0]) and torch.equal(bare_op(packed, x)(), eager(x)[0])
        return interleaved_medians(
            {"eager": lambda: eager(x), "module": lambda: packed(x), "bare op": bare_op(packed, x)},
            rounds=rounds,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per config")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for the README")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = ["(I,H,layers,dir,B,T)", "eager ms", "module ms", "bare op ms",
              "module vs eager", "bare op vs eager", "module overhead"]
    rows = []
    for config in CONFIGS:
        t = measure(config, args.rounds)
        I, H, layers, bidirectional, B, T = config
        rows.append([
            f"{I},{H},{layers},{'bi' if bidirectional else 'uni'},{B},{T}",
            f"{t['eager'] * 1e3:.3f}", f"{t['module'] * 1e3:.3f}", f"{t['bare op'] * 1e3:.3f}",
            f"{t['eager'] / t['module']:.2f}x", f"{t['eager'] / t['bare op']:.2f}x",
            f"{(t['module'] / t['bare op'] - 1) * 100:+.1f}%",
        ])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
