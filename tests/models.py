"""Realistic LSTM models for the tests, each built by a factory the CLI can name (``models:build_...``)."""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence


class SpeechEncoder(nn.Module):
    """Log-mel frames (batch, time, mels) -> conv front end (2x subsampling) -> 3-layer BiLSTM -> logits."""

    def __init__(self, mels: int = 40, channels: int = 32, hidden: int = 48, vocab: int = 30):
        super().__init__()
        self.frontend = nn.Sequential(
            nn.Conv1d(mels, channels, kernel_size=3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1), nn.ReLU(),
        )
        self.encoder = nn.LSTM(channels, hidden, num_layers=3, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * hidden, vocab)

    def forward(self, frames: Tensor) -> Tensor:
        x = self.frontend(frames.transpose(1, 2)).transpose(1, 2)
        y, _ = self.encoder(x)
        return self.classifier(y).log_softmax(-1)


class Tagger(nn.Module):
    """Token ids (batch, time) and lengths -> embedding -> BiLSTM over a PackedSequence -> tag scores."""

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


class Forecaster(nn.Module):
    """Encoder/decoder: encode a history (batch, time, features), then roll the decoder forward one step
    at a time from the encoder's (h, c), feeding back each prediction."""

    def __init__(self, features: int = 3, hidden: int = 40, horizon: int = 6):
        super().__init__()
        self.horizon = horizon
        self.encoder = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, features)

    def forward(self, history: Tensor) -> Tensor:
        _, state = self.encoder(history)
        step = history[:, -1:]
        outputs = []
        for _step in range(self.horizon):
            y, state = self.decoder(step, state)
            step = self.head(y)
            outputs.append(step)
        return torch.cat(outputs, 1)


class Encoder(nn.Module):
    """Frames in (batch, time, features), per-step features and the carried state out."""

    def __init__(self, features: int = 16, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        y, state = self.lstm(x, state)
        return self.head(y), state


class ProjectedEncoder(nn.Module):
    """An LSTMP encoder (proj_size > 0), as streaming transducers and Kaldi/ESPnet acoustic models have."""

    def __init__(self, features: int = 16, hidden: int = 32, proj: int = 12):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True, proj_size=proj)
        self.head = nn.Linear(proj, 4)

    def forward(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        y, state = self.lstm(x, state)
        return self.head(y), state


class Denoiser(nn.Module):
    """A GRU speech enhancer (frames of spectrum in, a mask out), batch first, its state carried."""

    def __init__(self, bins: int = 16, hidden: int = 32):
        super().__init__()
        self.gru = nn.GRU(bins, hidden, num_layers=2, batch_first=True)
        self.mask = nn.Linear(hidden, bins)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        y, state = self.gru(x, state)
        return torch.sigmoid(self.mask(y)) * x, state


class UnscriptableDenoiser(Denoiser):
    """The same, with a forward TorchScript cannot compile (**kwargs): its artifact is traced."""

    def forward(self, x, **options):
        return super().forward(x)[0] * len(options)


class Transcriber(nn.Module):
    """A DeepSpeech-style acoustic model: a bidirectional relu nn.RNN over frames, characters out."""

    def __init__(self, bins: int = 16, hidden: int = 40, characters: int = 29):
        super().__init__()
        self.rnn = nn.RNN(bins, hidden, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=True)
        self.characters = nn.Linear(2 * hidden, characters)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        y, state = self.rnn(x, state)
        return torch.log_softmax(self.characters(y), dim=-1), state


class UnscriptableTranscriber(Transcriber):
    """The same, with a forward TorchScript cannot compile (**kwargs): its artifact is traced."""

    def forward(self, x, **options):
        return super().forward(x)[0] * len(options)


class Unscriptable(nn.Module):
    """Fine in eager mode, but TorchScript cannot compile its forward (a dict comprehension over **kwargs)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 8)

    def forward(self, x, **options):
        scaled = {k: v * 2 for k, v in options.items()}
        return self.lstm(x)[0] * len(scaled)


def build_speech_encoder(**kwargs) -> SpeechEncoder:
    torch.manual_seed(0)
    return SpeechEncoder(**kwargs)


def build_tagger(**kwargs) -> Tagger:
    torch.manual_seed(0)
    return Tagger(**kwargs)


def build_forecaster(**kwargs) -> Forecaster:
    torch.manual_seed(0)
    return Forecaster(**kwargs)


class UnscriptableForecaster(nn.Module):
    """The forecaster written the way much real code is, which TorchScript cannot compile: tuple unpacking into
    `_` (then reused as an int), **kwargs, a helper from another library, arithmetic on shapes, and a dict
    output."""

    def __init__(self, features: int = 3, hidden: int = 40, horizon: int = 4):
        super().__init__()
        self.horizon = horizon
        self.encoder = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, features)

    def forward(self, history, **options):
        import math

        scale = options.get("scale", 1.0) / math.sqrt(1.0)
        recent = history[:, history.size(1) // 2:]  # the last half of the history
        _, state = self.encoder(recent * scale)
        step = recent[:, -1:]
        outputs = []
        for _ in range(self.horizon):
            y, state = self.decoder(step, state)
            step = self.head(y)
            outputs.append(step)
        return {"forecast": torch.cat(outputs, 1), "state": state[0]}


def build_unscriptable_forecaster(**kwargs) -> UnscriptableForecaster:
    torch.manual_seed(0)
    return UnscriptableForecaster(**kwargs)


class UnscriptableTagger(Tagger):
    """The tagger, with a forward TorchScript cannot compile (keyword arguments it passes on, a dict out)."""

    def forward(self, tokens, lengths, **options):
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed, **options)
        padded, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        return {"scores": self.out(padded)}


def build_unscriptable_tagger(**kwargs) -> UnscriptableTagger:
    torch.manual_seed(0)
    return UnscriptableTagger(**kwargs)


class BranchesOnLength(nn.Module):
    """Unscriptable, and its output depends on Python control flow over the sequence length: a trace
    freezes the branch taken on the example input."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)

    def forward(self, x, **options):
        y, _ = self.lstm(x)
        return y[:, -1] if x.size(1) > 10 else y.mean(1)


def build_branches_on_length() -> BranchesOnLength:
    torch.manual_seed(0)
    return BranchesOnLength()


class RolledDecoder(nn.Module):
    """An encoder LSTM, then a decoder LSTM rolled in a Python loop with its state carried; unscriptable
    (``_`` is a tensor, then a loop counter). Scripting it compiles the LSTMs before it fails."""

    def __init__(self, features: int = 7, hidden: int = 16, horizon: int = 5):
        super().__init__()
        self.encoder = nn.LSTM(features, hidden, batch_first=True)
        self.decoder = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.horizon = horizon

    def forward(self, x):
        _, state = self.encoder(x)
        y = x[:, -1:, :1]
        outputs = []
        for _ in range(self.horizon):
            out, state = self.decoder(y, state)
            y = self.head(out)
            outputs.append(y)
        return torch.cat(outputs, 1)


class FlatteningWrapper(nn.Module):
    """As speechbrain's and asteroid's LSTM wrappers do: ``flatten_parameters()`` in forward, here in code
    that cannot be scripted (``**kwargs``), so it is traced around a scripted LSTM."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(7, 16, batch_first=True)

    def forward(self, x, **kwargs):
        self.rnn.flatten_parameters()
        out, _ = self.rnn(x)
        return out


def build_rolled_decoder() -> RolledDecoder:
    torch.manual_seed(0)
    return RolledDecoder()


def build_flattening_wrapper() -> FlatteningWrapper:
    torch.manual_seed(0)
    return FlatteningWrapper()


def build_lightning_forecaster():
    """A LightningModule, as pyannote's and neuralforecast's models are: its ``trainer`` raises when
    read outside a Trainer, which TorchScript and the tracer do."""
    import lightning

    class LitForecaster(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(7, 16, batch_first=True)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    return LitForecaster()


class SamplingForecaster(nn.Module):
    """A DeepAR-style forecaster: the LSTM's outputs parametrize a Normal its forecasts are sampled from, in
    eval mode too. Input (batch, time, 3)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.lstm(x)
        mu, log_sigma = self.head(y).unbind(-1)
        return torch.normal(mu, log_sigma.exp())


class PrenetDecoder(nn.Module):
    """Tacotron2's prenet keeps dropout on at inference (``F.dropout(training=True)``) in front of its LSTM.
    Input (batch, time, 8)."""

    def __init__(self):
        super().__init__()
        self.prenet = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.dropout(torch.relu(self.prenet(x)), 0.5, training=True)
        return self.lstm(x)[0]


class ClockNoise(nn.Module):
    """Randomness no seed reaches: a generator of its own, seeded from the clock."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        import time

        generator = torch.Generator().manual_seed(time.perf_counter_ns())
        return self.lstm(x + torch.rand(x.shape, generator=generator))[0]


class WaveformDetector(nn.Module):
    """Raw audio in (batch, channel, samples): a strided conv front end, then an LSTM over the frames."""

    def __init__(self):
        super().__init__()
        self.frontend = nn.Conv1d(1, 16, kernel_size=40, stride=20)
        self.lstm = nn.LSTM(16, 32, batch_first=True)

    def forward(self, audio: Tensor) -> Tensor:
        frames = torch.relu(self.frontend(audio)).transpose(1, 2)
        return self.lstm(frames)[0]


class UnscriptableScaler(nn.Module):
    """No LSTM, and code TorchScript cannot compile (a loop variable named `_`, then reused): traced."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, **options):
        for _ in range(2):
            x = self.linear(x)
        return x * options.get("scale", 1.0)


class BatchDictForecaster(nn.Module):
    """Takes one dict of tensors, as neuralforecast's models take their windows batch."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, batch: Dict[str, Tensor]) -> Tensor:
        y, _ = self.lstm(torch.cat([batch["insample_y"], batch["hist_exog"]], 2))
        return self.head(y[:, -1])


class LengthAwareLSTM(nn.LSTM):
    """pytorch-forecasting's pattern: an nn.LSTM subclass whose forward takes the sequences' lengths and
    calls ``super().forward`` (on a PackedSequence when lengths are given)."""

    def forward(self, x, hx=None, lengths=None):
        if lengths is None:
            return super().forward(x, hx)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1), batch_first=self.batch_first,
                                                   enforce_sorted=False)
        out, state = super().forward(packed, hx)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first, total_length=x.size(1))[0], state


class OwnLoopLSTM(nn.LSTM):
    """An nn.LSTM subclass that reimplements forward on its own (here: the op itself, then a scale)."""

    def forward(self, x, hx=None):
        out, h, c = torch._VF.lstm(x, (torch.zeros(1, x.size(0), self.hidden_size),) * 2, self._flat_weights,
                                   True, 1, 0.0, False, False, True)
        return out * 2, (h, c)


class SubclassForecaster(nn.Module):
    """A DeepAR-like encoder over an ``LengthAwareLSTM``, and a head LSTM that reimplements forward. Input
    (batch, time, 3)."""

    def __init__(self):
        super().__init__()
        self.encoder = LengthAwareLSTM(3, 24, num_layers=2, batch_first=True)
        self.refine = OwnLoopLSTM(24, 24, batch_first=True)
        self.head = nn.Linear(24, 1)

    def forward(self, x):
        out, _ = self.encoder(x)
        out, _ = self.refine(out)
        return self.head(out[:, -1])


def build_subclass_forecaster() -> SubclassForecaster:
    torch.manual_seed(0)
    return SubclassForecaster()


class CellDecoder(nn.Module):
    """Tacotron2's decoder loop in small: an attention LSTMCell and a decoder LSTMCell rolled one frame at
    a time, each frame's output fed back. Input (batch, frames, features): the frames are teacher-forced
    inputs of the prenet."""

    def __init__(self, features: int = 8, hidden: int = 32):
        super().__init__()
        self.prenet = nn.Linear(features, hidden)
        self.attention_rnn = nn.LSTMCell(hidden + features, hidden)
        self.decoder_rnn = nn.LSTMCell(2 * hidden, hidden)
        self.project = nn.Linear(hidden, features)

    def forward(self, frames: Tensor) -> Tensor:
        batch = frames.size(0)
        h1 = c1 = frames.new_zeros(batch, self.attention_rnn.hidden_size)
        h2 = c2 = frames.new_zeros(batch, self.decoder_rnn.hidden_size)
        previous = frames.new_zeros(batch, frames.size(2))
        outputs = []
        for t in range(frames.size(1)):
            x = torch.relu(self.prenet(frames[:, t]))
            h1, c1 = self.attention_rnn(torch.cat([x, previous], 1), (h1, c1))
            h2, c2 = self.decoder_rnn(torch.cat([h1, x], 1), (h2, c2))
            previous = self.project(h2)
            outputs.append(previous)
        return torch.stack(outputs, 1)


def build_cell_decoder() -> CellDecoder:
    torch.manual_seed(0)
    return CellDecoder()


class GRUCellStreamer(nn.Module):
    """A streaming detector as wake-word and voice-activity models are written: two stacked GRUCells
    rolled one frame at a time, a score per frame. Input (batch, frames, features)."""

    def __init__(self, features: int = 8, hidden: int = 32):
        super().__init__()
        self.encoder_cell = nn.GRUCell(features, hidden)
        self.context_cell = nn.GRUCell(hidden, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, frames: Tensor) -> Tensor:
        h1 = frames.new_zeros(frames.size(0), self.encoder_cell.hidden_size)
        h2 = frames.new_zeros(frames.size(0), self.context_cell.hidden_size)
        scores = []
        for t in range(frames.size(1)):
            h1 = self.encoder_cell(frames[:, t], h1)
            h2 = self.context_cell(h1, h2)
            scores.append(self.score(h2))
        return torch.cat(scores, 1)


def build_gru_cell_streamer() -> GRUCellStreamer:
    torch.manual_seed(0)
    return GRUCellStreamer()


def rounded(lstm: nn.LSTM, weights: str = "int8") -> nn.LSTM:
    """``lstm`` with its weights as the native kernel's packs hold them: for int8, per gate row and part,
    w = round(w / s) * s with s = max|w| / 127; for bf16, w rounded to bf16 (projections stay fp32). Imports
    nothing of lstmopt's: the fresh processes of test_native use it beside a native library alone."""
    copy = nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias, batch_first=lstm.batch_first,
                   bidirectional=lstm.bidirectional, proj_size=lstm.proj_size).eval()
    copy.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if name.startswith("weight_hr"):
                continue
            if name.startswith("weight") and weights == "bfloat16":
                p.copy_(p.bfloat16().float())
            elif name.startswith("weight"):
                scale = p.abs().amax(1, keepdim=True) / 127
                p.copy_((p / scale.clamp_min(1e-38)).round().clamp(-127, 127) * scale)
    return copy


def trained_like(lstm: nn.Module, scale: float, saturation: float, seed: int) -> nn.Module:
    """A recurrent module's weights at ``scale`` x PyTorch's initial magnitude, biases pushed by N(0, saturation) so that
    gates sit in the flat ends of their sigmoids, as trained LSTMs' often do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            p.mul_(scale)
            if name.startswith("bias"):
                p.add_(saturation * torch.randn(p.shape, generator=generator))
    return lstm.eval()


def contract_inputs(generator: torch.Generator, input_size: int, batch: Optional[int], steps: int,
                    batch_first: bool, sequence: bool, states: int):
    """A recurrent module's input for a contract test, its float64 twin, and the leading sizes of its states:
    a PackedSequence of ``batch or 1`` sequences of 1 to ``steps`` steps in any order, or a tensor (unbatched
    where ``batch`` is None)."""
    if sequence:
        lengths = torch.randint(1, steps + 1, (batch or 1,), generator=generator).tolist()
        rows = [2 * torch.randn(n, input_size, generator=generator) for n in lengths]
        return (pack_sequence(rows, enforce_sorted=False),
                pack_sequence([r.double() for r in rows], enforce_sorted=False), (states, batch or 1))
    shape = (steps, input_size) if batch is None else (
        (batch, steps, input_size) if batch_first else (steps, batch, input_size))
    x = 2 * torch.randn(shape, generator=generator)
    return x, x.double(), (states,) if batch is None else (states, batch)


def assert_within_contract(expected, actual, truth) -> None:
    """Each of ``actual``'s tensors (PackedSequences by their data) as shaped as eager's (``expected``) and
    within the approximate-kernel contract against the float64 ``truth``."""
    from lstmopt.kernels.accuracy import accuracy

    for e, a, t in zip(*((x.data if isinstance(x, PackedSequence) else x for x in outputs)
                         for outputs in (expected, actual, truth))):
        assert a.shape == e.shape
        measured = accuracy(e, a, t)
        assert measured.ok, measured
