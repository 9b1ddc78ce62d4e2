"""The model ``lstmopt demo`` optimizes: a small streaming keyword spotter bundled with the package.

40 MFCC features per 10 ms frame -> 2-layer LSTM (128 units) -> 12 keyword scores per frame.
"""

import torch
from torch import Tensor, nn

INPUT_SHAPE = (1, 100, 40)  # one second of audio, one stream


class KeywordSpotter(nn.Module):
    def __init__(self, features: int = 40, hidden: int = 128, keywords: int = 12):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.scores = nn.Linear(hidden, keywords)

    def forward(self, frames: Tensor) -> Tensor:
        states, _ = self.lstm(frames)
        return self.scores(states)


def build_keyword_spotter(seed: int = 0) -> KeywordSpotter:
    """The factory ``lstmopt demo`` names with ``--factory lstmopt.demo:build_keyword_spotter``."""
    torch.manual_seed(seed)
    return KeywordSpotter().eval()


def demo_inputs() -> list:
    """What ``lstmopt demo`` verifies and times (``--example-inputs lstmopt.demo:demo_inputs``): one 10 ms frame of
    one stream, as a streaming recognizer calls the model, and one second of it."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 1, 40, generator=generator),), (torch.randn(*INPUT_SHAPE, generator=generator),)]
