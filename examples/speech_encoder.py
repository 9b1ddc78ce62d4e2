"""Speech encoder: log-mel frames -> conv front end (2x subsampling) -> 3-layer BiLSTM -> CTC logits.

    python examples/speech_encoder.py [--out-dir DIR]

builds the model with random weights (fixed seed), saves its state dict, optimizes it with the lstmopt
CLI (TorchScript, verified in a fresh process, benchmarked) and prints what happened.
"""

import torch
from torch import Tensor, nn


class SpeechEncoder(nn.Module):
    def __init__(self, mels: int = 80, channels: int = 256, hidden: int = 256, layers: int = 3, vocab: int = 32):
        super().__init__()
        self.frontend = nn.Sequential(
            nn.Conv1d(mels, channels, kernel_size=3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1), nn.GELU(),
        )
        self.encoder = nn.LSTM(channels, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.ctc = nn.Linear(2 * hidden, vocab)

    def forward(self, frames: Tensor) -> Tensor:
        """(batch, time, mels) -> (batch, time / 2, vocab) log-probabilities."""
        x = self.frontend(frames.transpose(1, 2)).transpose(1, 2)
        encoded, _ = self.encoder(x)
        return self.ctc(encoded).log_softmax(-1)


def build(seed: int = 0, **sizes) -> SpeechEncoder:
    """The factory lstmopt calls: ``--factory speech_encoder:build``."""
    torch.manual_seed(seed)
    return SpeechEncoder(**sizes).eval()


if __name__ == "__main__":
    from common import lstmopt, parse_args

    args = parse_args(__doc__.splitlines()[0])
    weights = args.out_dir / "speech_encoder.pt"
    torch.save(build().state_dict(), weights)
    print(f"saved {weights}")
    lstmopt("optimize", weights, "-o", args.out_dir / "speech_encoder.opt.pt", "--factory", "speech_encoder:build",
            "--input-shape", "4,200,80", "--bench", "--force")
