"""What the benchmark's sections share: the models they time, ONNX Runtime sessions, formatting."""

import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstmopt import optimize
from lstmopt.modules.pack_state import PackedModule
from lstmopt.artifacts.writing import save_artifact

BIG = dict(input_size=512, hidden_size=1024, num_layers=3, bidirectional=True)


# ONNX Runtime's idle threads spin for ~50 ms after a call (measured): a pause of twice that before each
# timed block, then a warm-up inside it; see the module docstring.
SPINNING_PEER = dict(settle_s=0.1, warm_s=0.02)


def fastest(module: nn.Module, args: tuple) -> nn.Module:
    """lstmopt's fastest kernels for these calls, approximation allowed (what --autotune --approx does)."""
    return optimize(module, autotune=[args], exact=False)


def kernels(model: nn.Module) -> str:
    chosen = {m.kernel for m in model.modules() if isinstance(m, PackedModule)}
    return "/".join(sorted(chosen))


class WithState(nn.Module):
    """What a streaming model runs per chunk: the LSTM (or GRU, RNN: ``h`` only) with the state carried in and out."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *state):
        if len(state) == 1:  # a GRU's or an RNN's
            return self.rnn(x, state[0])
        y, (h, c) = self.rnn(x, state)
        return y, h, c


def _session(onnx: bytes):
    """Default session options but for the intra-op thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def ort_session(rnn: nn.Module, x, *state, int8: bool = False):
    """ONNX Runtime on the exported LSTM (state h, c) or GRU, RNN (state h): a callable and its output. ``int8``:
    the model as ``onnxruntime.quantization.quantize_dynamic`` makes it at its defaults (int8 weights; ORT
    runs its DynamicQuantizeLSTM, activations quantized per call)."""
    buf = io.BytesIO()
    names = ["h0", "c0"][:len(state)]
    torch.onnx.export(WithState(rnn), (x, *state), buf, input_names=["x", *names],
                      output_names=["y", "h", "c"][:1 + len(state)], dynamo=False,
                      dynamic_axes={"x": {0: "T", 1: "B"}, **{name: {1: "B"} for name in names}})
    model = buf.getvalue()
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process, once per model
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "fp32.onnx").write_bytes(model)
            quantize_dynamic(Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", weight_type=QuantType.QInt8)
            model = (Path(tmp) / "int8.onnx").read_bytes()
    session = _session(model)
    feed = {"x": x.numpy(), **{name: s.numpy() for name, s in zip(names, state)}}
    y = session.run(None, feed)[0]
    return (lambda: session.run(None, feed)), torch.from_numpy(y)


class CellStep(nn.Module):
    """One LSTMCell (state h, c) or GRUCell (state h) step with the state in and out, as a decoder exports
    it to ONNX."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, *state):
        return self.cell(x, state[0] if isinstance(self.cell, nn.GRUCell) else state)


def ort_cell_sessions(cell: nn.Module, x, *state):
    """ONNX Runtime on one step of ``cell`` (an LSTMCell given h, c or a GRUCell given h) two ways: the
    exported cell (what a model's ONNX export holds: MatMuls and pointwise ops) and ORT's fused LSTM or GRU
    operator on a one-step nn.LSTM or nn.GRU with the same weights (its fastest way to run a cell). Returns
    both callables and the graph's h."""
    names = ["h0", "c0"][:len(state)]
    buf = io.BytesIO()
    torch.onnx.export(CellStep(cell), (x, *state), buf, input_names=["x", *names],
                      output_names=["h", "c"][:len(state)], dynamo=False)
    graph = _session(buf.getvalue())
    feed = {"x": x.numpy(), **{name: s.numpy() for name, s in zip(names, state)}}
    rnn = (nn.GRU if isinstance(cell, nn.GRUCell) else nn.LSTM)(cell.input_size, cell.hidden_size).eval()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, f"{name}_l0").copy_(getattr(cell, name))
    run_op, _ = ort_session(rnn, x[None], *(s[None] for s in state))
    h_graph = torch.from_numpy(graph.run(None, feed)[0])
    return (lambda: graph.run(None, feed)), run_op, h_graph


class CellDecoder(nn.Module):
    """The recurrent core of Tacotron2's decoder as torchaudio builds it (sizes by default): per frame a
    prenet, an attention LSTMCell, a stand-in for the attention (one linear layer), a decoder LSTMCell
    and the mel projection, batch 1, rolled frame by frame."""

    def __init__(self, mels=80, prenet=256, context=512, attention=1024, decoder=1024):
        super().__init__()
        self.sizes = (context, attention, decoder)
        self.prenet = nn.Sequential(nn.Linear(mels, prenet), nn.ReLU())
        self.attention_rnn = nn.LSTMCell(prenet + context, attention)
        self.attend = nn.Linear(attention, context)
        self.decoder_rnn = nn.LSTMCell(attention + context, decoder)
        self.project = nn.Linear(decoder + context, mels)

    def forward(self, frames):
        context, attention, decoder = self.sizes
        batch = frames.size(1)
        ctx = frames.new_zeros(batch, context)
        ah = ac = frames.new_zeros(batch, attention)
        dh = dc = frames.new_zeros(batch, decoder)
        outputs = []
        for frame in frames:
            ah, ac = self.attention_rnn(torch.cat([self.prenet(frame), ctx], 1), (ah, ac))
            ctx = torch.tanh(self.attend(ah))
            dh, dc = self.decoder_rnn(torch.cat([ah, ctx], 1), (dh, dc))
            outputs.append(self.project(torch.cat([dh, ctx], 1)))
        return torch.stack(outputs)


def median(times, key):
    return statistics.median(t[key] for t in times)


def spread(ratios) -> str:
    """A ratio over runs: its median and range."""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def us(seconds):
    return f"{seconds * 1e6:.0f}"


def ms(seconds):
    return f"{seconds * 1e3:.3f}"


class Tagger(nn.Module):
    def __init__(self, vocab=5000, dim=128, hidden=256, tags=20):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        padded, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        return self.out(padded)


def artifact(model, fmt, directory, example=None):
    """``model`` written as an artifact of ``fmt`` (exported on ``example`` for pt2 and aoti) and loaded back
    as a deployment loads it."""
    from lstmopt.job.verify_child import load_program

    path = Path(directory) / f"{type(model).__name__}.{len(list(Path(directory).iterdir()))}.{fmt}.pt"
    save_artifact(model, path, format=fmt, metadata={}, samples=[example] if example is not None else [])
    if fmt in ("pt2", "aoti"):
        return load_program(path, fmt)
    return torch.jit.load(str(path)) if fmt == "torchscript" else torch.load(path, weights_only=False)


class Streamer(nn.Module):
    """A streaming model around an LSTM: a projection in, the LSTM, a classifier out."""

    def __init__(self, features, hidden, layers):
        super().__init__()
        self.front = nn.Linear(features, features)
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 12)

    def forward(self, x):
        y, _ = self.lstm(torch.relu(self.front(x)))
        return self.head(y)


MEMORY_PROBE = """
import json, sys, time, torch
from torch import nn
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
torch.manual_seed(0)
x = torch.randn(50, 4, 512)
base = rss_mb()
model = nn.LSTM(**json.loads(sys.argv[2])).eval()
seconds = 0.0
if sys.argv[1] == "optimized":
    from lstmopt import optimize
    start = time.perf_counter()
    model = optimize(model, inplace=True)
    seconds = time.perf_counter() - start
with torch.inference_mode():
    for _ in range(3):
        model(x)
print(json.dumps({"mb": rss_mb() - base, "convert_s": seconds}))
"""


def memory_and_conversion():
    rows = {}
    for mode in ("original", "optimized"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, json.dumps(BIG)], capture_output=True,
                              text=True, check=True)
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    lstm = nn.LSTM(**BIG).eval()
    start = time.perf_counter()
    optimize(lstm)  # with the copy of the model optimize makes by default
    copy_s = time.perf_counter() - start
    return rows, copy_s


def table(header, rows, markdown):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)
