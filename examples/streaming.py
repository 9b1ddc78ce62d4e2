"""Streaming recognizer front: audio-like frames arrive 10 at a time (100 ms); each chunk goes through a
2-layer LSTM that carries (h, c) from one call to the next.

    python examples/streaming.py [--out-dir DIR] [--chunks 200]

Saves the model, optimizes it with the CLI (TorchScript), then streams the same audio through the original
and the optimized model, checks every chunk's output is identical, and prints per-chunk latency.
"""

import statistics
import time
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


class StreamingEncoder(nn.Module):
    def __init__(self, features: int = 40, hidden: int = 256, layers: int = 2, outputs: int = 64):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, chunk: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """chunk (1, frames, features), state from the previous chunk -> (scores, new state)."""
        hidden, state = self.lstm(chunk, state)
        return self.out(hidden), state


def build(seed: int = 0, **sizes) -> StreamingEncoder:
    """The factory lstmopt calls: ``--factory streaming:build``."""
    torch.manual_seed(seed)
    return StreamingEncoder(**sizes).eval()


def stream(model, chunks) -> tuple[list, list]:
    """Run the chunks in order, carrying the state; return per-chunk outputs and latencies (ms)."""
    state, outputs, latencies = None, [], []
    with torch.inference_mode():
        for chunk in chunks:
            start = time.perf_counter()
            scores, state = model(chunk, state)
            latencies.append((time.perf_counter() - start) * 1e3)
            outputs.append(scores)
    return outputs, latencies


if __name__ == "__main__":
    import argparse
    import sys

    from common import lstmopt, parse_args

    chunks_arg = argparse.ArgumentParser(add_help=False)
    chunks_arg.add_argument("--chunks", type=int, default=200)
    known, sys.argv[1:] = chunks_arg.parse_known_args()
    args = parse_args(__doc__.splitlines()[0])
    weights, artifact = args.out_dir / "streaming.pt", args.out_dir / "streaming.opt.pt"
    original = build()
    torch.save(original.state_dict(), weights)
    print(f"saved {weights}")
    lstmopt("optimize", weights, "-o", artifact, "--factory", "streaming:build", "--input-shape", "1,10,40",
            "--force", "--quiet")
    optimized = torch.jit.load(str(artifact))

    audio = torch.randn(1, known.chunks * 10, 40, generator=torch.Generator().manual_seed(1))
    chunks = list(audio.split(10, dim=1))
    stream(original, chunks[:20]), stream(optimized, chunks[:20])  # warm up both
    # Alternate the two streams so machine noise hits both alike.
    runs = [stream(model, chunks) for _ in range(3) for model in (original, optimized)]
    eager_out, optimized_out = runs[0][0], runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(eager_out, optimized_out)), "outputs differ"
    eager_ms = statistics.median(ms for run in runs[0::2] for ms in run[1])
    fast_ms = statistics.median(ms for run in runs[1::2] for ms in run[1])
    print(f"{len(chunks)} chunks of 10 frames, state carried between calls; every chunk's output identical")
    print(f"median per-chunk latency: nn.LSTM {eager_ms:.3f} ms, lstmopt {fast_ms:.3f} ms "
          f"-> {eager_ms / fast_ms:.2f}x nn.LSTM's speed")
