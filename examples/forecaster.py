"""Time-series forecaster: an LSTM encoder reads the history; an LSTM decoder, started from the encoder's
(h, c), rolls forward one step at a time, feeding back each prediction.

    python examples/forecaster.py [--out-dir DIR]

The decoder runs one time step per call with a carried state: the small-shape case where eager nn.LSTM
spends most of its time re-laying-out weights.
"""

import torch
from torch import Tensor, nn


class Forecaster(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 64, layers: int = 2, horizon: int = 12):
        super().__init__()
        self.horizon = horizon
        self.encoder = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.decoder = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, features)

    def forward(self, history: Tensor) -> Tensor:
        """(batch, time, features) -> (batch, horizon, features)."""
        _, state = self.encoder(history)
        step = history[:, -1:]
        predictions = []
        for _step in range(self.horizon):
            out, state = self.decoder(step, state)
            step = self.head(out)
            predictions.append(step)
        return torch.cat(predictions, dim=1)


def build(seed: int = 0, **sizes) -> Forecaster:
    """The factory lstmopt calls: ``--factory forecaster:build``."""
    torch.manual_seed(seed)
    return Forecaster(**sizes).eval()


if __name__ == "__main__":
    from common import lstmopt, parse_args

    args = parse_args(__doc__.splitlines()[0])
    weights = args.out_dir / "forecaster.pt"
    torch.save(build().state_dict(), weights)
    print(f"saved {weights}")
    lstmopt("optimize", weights, "-o", args.out_dir / "forecaster.opt.pt", "--factory", "forecaster:build",
            "--input-shape", "16,96,8", "--bench", "--force")
