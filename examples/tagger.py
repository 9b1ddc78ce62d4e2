"""Sequence tagger: token ids -> embedding -> 2-layer BiLSTM over a PackedSequence -> tag scores.

    python examples/tagger.py [--out-dir DIR]

The model takes (tokens, lengths), so lstmopt gets example inputs instead of a shape. Padded batches go
through pack_padded_sequence. Optimized twice:

- by default (bit-identical): a PackedSequence takes nn.LSTM's own path, as fast as the original (0.99-1.03x
  eager in benchmarks/bench_lstm.py), while the unpacked call used for single sentences takes the packed kernel;
- with ``--autotune --approx`` (approximate, within 8x eager's own error): PackedSequences run on a sequence kernel that
  computes every length group on packed weights, 2.7-2.9x eager's speed on the benchmark's tagger.

Both runs print the speedup they measured (``--bench``) on these batches.
"""

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class Tagger(nn.Module):
    def __init__(self, vocab: int = 5000, dim: int = 100, hidden: int = 128, tags: int = 17):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.tags = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (batch, time) int64 padded with 0, lengths (batch,) -> (batch, time, tags) scores."""
        embedded = self.embed(tokens)
        if bool((lengths == tokens.size(1)).all()):  # nothing padded: run the tensor directly
            hidden, _ = self.lstm(embedded)
        else:
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            hidden, _ = self.lstm(packed)
            hidden, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        return self.tags(hidden)


def build(seed: int = 0, **sizes) -> Tagger:
    """The factory lstmopt calls: ``--factory tagger:build``."""
    torch.manual_seed(seed)
    return Tagger(**sizes).eval()


def example_batches(seed: int = 0) -> list:
    """(tokens, lengths) batches: single sentences and padded batches of several lengths."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for batch, steps in [(1, 12), (1, 40), (16, 25), (32, 60)]:
        lengths = torch.full((batch,), steps) if batch == 1 else torch.randint(3, steps + 1, (batch,), generator=g)
        lengths[0] = steps
        tokens = torch.randint(1, 5000, (batch, steps), generator=g)
        tokens[torch.arange(steps) >= lengths[:, None]] = 0
        batches.append((tokens, lengths))
    return batches


if __name__ == "__main__":
    from common import lstmopt, parse_args

    args = parse_args(__doc__.splitlines()[0])
    weights, inputs = args.out_dir / "tagger.pt", args.out_dir / "tagger_inputs.pt"
    torch.save(build().state_dict(), weights)
    torch.save(example_batches(), inputs)
    print(f"saved {weights} and {inputs}")
    lstmopt("optimize", weights, "-o", args.out_dir / "tagger.opt.pt", "--factory", "tagger:build",
            "--example-inputs", inputs, "--bench", "--force")
    lstmopt("optimize", weights, "-o", args.out_dir / "tagger.approx.pt", "--factory", "tagger:build",
            "--example-inputs", inputs, "--autotune", "--approx", "--bench", "--force")
