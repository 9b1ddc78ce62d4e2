"""Small realistic models for the tests (importable by name from fresh processes via sys.path)."""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class Tagger(nn.Module):
    """Embedding + BiLSTM + linear, run on padded batches through a PackedSequence."""

    def __init__(self, vocab: int = 50, dim: int = 24, hidden: int = 20, tags: int = 7):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        padded, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        return self.out(padded)


class Encoder(nn.Module):
    """Frames in (batch, time, features), summary and per-step features out; carries state."""

    def __init__(self, features: int = 16, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        y, state = self.lstm(x, state)
        return self.head(y), state
