"""lstmopt's numbers, every one measured side by side in one process and reported as ratios.

    python benchmarks/bench_lstm.py [--rounds 21] [--runs 3] [--threads N] [--onnxruntime] [--compile]
                                    [--markdown] [--update-readme docs/performance.md]

1. Latency, fp32: eager nn.LSTM; lstmopt's default, bit-identical kernel (PackedLSTM, "onednn"); the bare op
   on the same packed weights (``torch.mkldnn_rnn_layer``, nothing checked: the floor for that kernel);
   lstmopt's fastest kernel with approximation allowed (``optimize(m, autotune=[...], exact=False)``).
2. Streaming against ONNX Runtime (``--onnxruntime``): one step and short chunks with the state carried
   from call to call, lstmopt's fastest kernel against ORT's CPU LSTM on the same export, ORT with its
   default session options and the same number of intra-op threads. Each of ``--runs`` runs times every
   shape afresh; the table gives the median and the range of the ratios over the runs.
2e. Low precision (``--onnxruntime``): at the streaming shapes, lstmopt's int8 (``optimize(m, dtype=torch.int8)``)
   against ONNX Runtime's int8 LSTM (``quantize_dynamic`` at its defaults), with both fp32s beside them and
   each int8 side's largest error against eager fp32 on the same inputs.
2f. torch.ao's dynamic-quantized LSTM and GRU (qint8): the module ``torch.ao.quantization.quantize_dynamic``
   makes, against lstmopt's conversion of it (``optimize`` of the quantized model: the LSTM on its int8 weights,
   the GRU on its dequantized weights, both on the native kernel), at the streaming shapes and at the tagger and
   server shapes; each side's largest error against eager fp32 on the same inputs.
2b. nn.LSTMCell: one step of a cell (batch 1, state given) eager, on lstmopt's default kernel (ATen's cell
   op called directly: bit-identical) and on its native kernel (``exact=False``), against ONNX Runtime
   (``--onnxruntime``) on the exported cell and with its fused LSTM operator; and a Tacotron2-like decoder
   loop (two LSTMCells, 50 frames) eager, optimized by default and with ``exact=False``.
2c. nn.GRU and nn.GRUCell: a GRU (no exact kernel: kept by default, the native kernel with ``exact=False``)
   at the streaming shapes and at the tagger and server shapes of section 1, eager against lstmopt and
   ONNX Runtime (``--onnxruntime``) on the same export; a GRUCell's step as the LSTMCell's in 2b; nn.RNN (relu,
   tanh) as the GRU.
2d. LSTMs with proj_size > 0 (LSTMP): one step and a 16-step chunk with the state carried, eager against
   lstmopt with approximation allowed (``optimize(m, exact=False)``: the native kernel, the projection fused;
   by default an LSTMP is kept, having no exact kernel). ONNX Runtime has no row: torch.onnx cannot export
   an LSTM with projections (the TorchScript exporter refuses it; the dynamo exporter's graph fails ORT's
   shape inference).
3. Variable-length batches (PackedSequence): a tagger (embedding, pack_padded_sequence, 2-layer BiLSTM,
   pad_packed_sequence, linear) eager, optimized by default (nn.LSTM's path: must cost no more than eager),
   as its TorchScript and pickle artifacts, and with its fastest kernels (``exact=False``). Also a forward
   with autograd on, the other common stock-path case.
4. torch.compile and AOTInductor (``--compile``): a model around an LSTM compiled as is and after
   ``optimize``, against the optimized model run eagerly; AOTInductor's compile time and latency on the
   original and on lstmopt's ``torch.export`` graph.
5. bf16 against eager fp32 (oneDNN's bf16 where the CPU has native bf16, else lstmopt's native kernel on bf16
   weights), and the resident memory and conversion time
   of a 3-layer bidirectional LSTM with I=512, H=1024.
6. Deployment formats: a streaming model's TorchScript, pickle, pt2 and (``--compile``) aoti artifacts,
   each loaded as a deployment loads it, against the optimized model in Python, default and --approx.

Peers that keep threads spinning after a call (ONNX Runtime by default) are given a pause before each
timed block and a warm-up inside it, so that no variant is timed while another's threads hold the CPU.
"""

import argparse
import functools
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lstmopt import PackedLSTM, native, optimize
from lstmopt.modules.packs import bf16_supported
from lstmopt.rewrite.timing import interleaved_medians
from bench_support import (BIG, SPINNING_PEER, CellDecoder, Streamer, Tagger, artifact, fastest, kernels, median,
                           memory_and_conversion, ms, ort_cell_sessions, ort_session, spread, table, us)

# (input_size, hidden_size, layers, bidirectional, batch, steps)
CONFIGS = [
    (40, 128, 1, False, 1, 1),
    (80, 256, 2, False, 1, 16),
    (128, 256, 2, True, 8, 50),
    (256, 512, 2, False, 16, 100),
]
# (name, input_size, hidden_size, layers, batch, steps): where streaming models live
STREAMING = [
    ("keyword spotting, one step", 40, 128, 1, 1, 1),
    ("voice activity, one step", 128, 128, 1, 1, 1),
    ("2-layer, one step", 80, 256, 2, 1, 1),
    ("16 streams, one step", 80, 256, 2, 16, 1),
    ("16-step chunk", 80, 256, 2, 1, 16),
]


def name(config) -> str:
    I, H, layers, bidirectional, B, T = config
    return f"{I},{H},{layers},{'bi' if bidirectional else 'uni'},{B},{T}"


def bare_op(packed: PackedLSTM, x: torch.Tensor):
    """The floor of the default kernel: the op per layer and direction, no checks, states preallocated."""
    zeros = torch.zeros(x.size(1), packed.hidden_size)
    args = list(packed._state.kernel_args)
    H, bias, bidirectional = packed.hidden_size, packed.bias, packed.bidirectional
    op = torch.mkldnn_rnn_layer

    def run():
        inp = x
        for i in range(0, len(args), 2 if bidirectional else 1):
            w_ih, w_hh, b_ih, b_hh, rev = args[i]
            y = op(inp, w_ih, w_hh, b_ih, b_hh, zeros, zeros, rev, [], 2, H, 1, bias, False, False, False)[0]
            if bidirectional:
                w_ih, w_hh, b_ih, b_hh, rev = args[i + 1]
                y_r = op(inp, w_ih, w_hh, b_ih, b_hh, zeros, zeros, rev, [], 2, H, 1, bias, False, False, False)[0]
                y = torch.cat([y, y_r], 2)
            inp = y
        return inp

    return run


def latency(config, rounds):
    I, H, layers, bidirectional, B, T = config
    torch.manual_seed(0)
    eager = nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional).eval()
    packed = PackedLSTM.from_lstm(eager).eval()
    x = torch.randn(T, B, I)
    with torch.no_grad():
        best = fastest(eager, (x,))
        assert torch.equal(eager(x)[0], packed(x)[0])
        torch.testing.assert_close(best(x)[0], eager(x)[0], atol=1e-6, rtol=1e-6)
        variants = {"eager": lambda: eager(x), "module": lambda: packed(x), "bare op": bare_op(packed, x),
                    "fastest": lambda: best(x)}
        return interleaved_medians(variants, rounds=rounds), kernels(best)


# --- 2. streaming against ONNX Runtime ----------------------------------------------------------------


def timed_runs(setups: dict, rounds: int, runs: int) -> dict:
    """Per label, ``runs`` timings of its variants (each run times every setup afresh, for the range of the
    ratios). Every block starts after a pause and a warm-up (``SPINNING_PEER``), whether or not a peer spins."""
    results = {label: [] for label in setups}
    for _ in range(runs):
        for label, variants in setups.items():
            with torch.no_grad():
                results[label].append(interleaved_medians(variants, rounds=rounds, **SPINNING_PEER))
    return results


def streaming(rounds, runs):
    setups = []
    for label, I, H, layers, B, T in STREAMING:
        torch.manual_seed(0)
        eager = nn.LSTM(I, H, num_layers=layers).eval()
        x, h, c = torch.randn(T, B, I), torch.randn(layers, B, H), torch.randn(layers, B, H)
        with torch.no_grad():
            best = fastest(eager, (x, (h, c)))
            expected = eager(x, (h, c))[0]
            torch.testing.assert_close(best(x, (h, c))[0], expected, atol=1e-6, rtol=1e-6)
        run_ort, y = ort_session(eager, x, h, c)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        variants = {"eager": lambda e=eager, a=(x, (h, c)): e(*a), "lstmopt": lambda b=best, a=(x, (h, c)): b(*a),
                    "onnxruntime": run_ort}
        setups.append((label, (I, H, layers, B, T), kernels(best), variants))
    results = timed_runs({label: variants for label, _, _, variants in setups}, rounds, runs)
    rows = []
    for label, shape, kernel, _ in setups:
        times = results[label]
        ratios = [t["lstmopt"] / t["onnxruntime"] for t in times]
        rows.append([label, ",".join(map(str, shape)), kernel, us(median(times, "eager")),
                     us(median(times, "onnxruntime")), us(median(times, "lstmopt")),
                     spread(ratios)])
    return rows


# --- 2e. low precision ----------------------------------------------------------------------------------


def low_precision(rounds, runs):
    """lstmopt's int8 (``optimize(m, dtype=torch.int8)``) against ONNX Runtime's int8 LSTM and both fp32s, at
    the streaming shapes; each int8 side's largest error against eager fp32 on the same inputs."""
    setups = []
    for label, I, H, layers, B, T in STREAMING:
        torch.manual_seed(0)
        eager = nn.LSTM(I, H, num_layers=layers).eval()
        x, h, c = torch.randn(T, B, I), torch.randn(layers, B, H), torch.randn(layers, B, H)
        int8, bf16 = optimize(eager, dtype=torch.int8), optimize(eager, dtype=torch.bfloat16)
        with torch.no_grad():
            expected, ours, ours16 = eager(x, (h, c))[0], int8(x, (h, c))[0], bf16(x, (h, c))[0]
            best = fastest(eager, (x, (h, c)))
        run_ort, _ = ort_session(eager, x, h, c)
        run_ort8, theirs = ort_session(eager, x, h, c, int8=True)
        errors = [(y - expected).abs().max().item() for y in (ours, theirs, ours16)]
        variants = {"lstmopt int8": lambda m=int8, a=(x, (h, c)): m(*a), "onnxruntime int8": run_ort8,
                    "lstmopt fp32": lambda m=best, a=(x, (h, c)): m(*a), "onnxruntime": run_ort,
                    "lstmopt bf16": lambda m=bf16, a=(x, (h, c)): m(*a)}
        setups.append((label, (I, H, layers, B, T), errors, variants))
    results = timed_runs({label: variants for label, _, _, variants in setups}, rounds, runs)
    rows = []
    for label, shape, errors, _ in setups:
        times = results[label]
        rows.append([label, ",".join(map(str, shape)), us(median(times, "onnxruntime")),
                     us(median(times, "onnxruntime int8")), f"{errors[1]:.1e}", us(median(times, "lstmopt fp32")),
                     us(median(times, "lstmopt int8")), f"{errors[0]:.1e}", us(median(times, "lstmopt bf16")),
                     f"{errors[2]:.1e}",
                     spread([t["lstmopt int8"] / t["onnxruntime int8"] for t in times]),
                     spread([t["lstmopt fp32"] / t["onnxruntime"] for t in times])])
    return rows


# --- 2f. torch.ao's dynamic-quantized modules ----------------------------------------------------------

# (name, kind, input_size, hidden_size, layers, bidirectional, batch, steps)
QUANTIZED = [(f"LSTM, {label}", nn.LSTM, I, H, layers, False, B, T) for label, I, H, layers, B, T in STREAMING] + [
    ("LSTM, tagger shape", nn.LSTM, 128, 256, 2, True, 8, 50), ("LSTM, server shape", nn.LSTM, 256, 512, 2, False, 16, 100),
    ("GRU, one step", nn.GRU, 80, 256, 2, False, 1, 1), ("GRU, 16-step chunk", nn.GRU, 80, 256, 2, False, 1, 16),
    ("GRU, tagger shape", nn.GRU, 128, 256, 2, True, 8, 50), ("GRU, server shape", nn.GRU, 256, 512, 2, False, 16, 100)]


class _Holder(nn.Module):
    """quantize_dynamic swaps children only (a bare module stays fp32): the recurrent module as a child."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h):
        return self.rnn(x, h)


def quantized(rounds, runs):
    """torch.ao's qint8 module against lstmopt's conversion of it, and both errors against eager fp32."""
    setups = []
    for label, kind, I, H, layers, bidirectional, B, T in QUANTIZED:
        torch.manual_seed(0)
        eager = _Holder(kind(I, H, num_layers=layers, bidirectional=bidirectional)).eval()
        ao = torch.ao.quantization.quantize_dynamic(eager, {kind}, dtype=torch.qint8)
        ours = optimize(ao)
        assert kernels(ours.rnn) == "native", kernels(ours.rnn)
        states = layers * (2 if bidirectional else 1)
        x, h = torch.randn(T, B, I), torch.randn(states, B, H)
        args = (x, (h, torch.randn(states, B, H)) if kind is nn.LSTM else h)
        with torch.no_grad():
            expected = eager(*args)[0]
            errors = [(m(*args)[0] - expected).abs().max().item() for m in (ao, ours)]
        variants = {"torch.ao": lambda m=ao, a=args: m(*a), "lstmopt": lambda m=ours, a=args: m(*a)}
        setups.append((label, (I, H, layers, "bi" if bidirectional else "uni", B, T), errors, variants))
    results = timed_runs({label: variants for label, _, _, variants in setups}, rounds, runs)
    return [[label, ",".join(map(str, shape)), us(median(results[label], "torch.ao")), f"{errors[0]:.1e}",
             us(median(results[label], "lstmopt")), f"{errors[1]:.1e}",
             spread([t["lstmopt"] / t["torch.ao"] for t in results[label]])]
            for label, shape, errors, _ in setups]


# --- 2b. nn.LSTMCell ----------------------------------------------------------------------------------

# (name, input_size, hidden_size): one step, batch 1
CELLS = [
    ("small cell", 80, 256),
    ("Tacotron2 attention cell", 768, 1024),
    ("Tacotron2 decoder cell", 1536, 1024),
]
GRU_CELLS = [
    ("small GRU cell", 80, 256),
    ("large GRU cell", 512, 1024),
]
DECODER_FRAMES = 50


def cells(rounds, runs, with_ort, kind=nn.LSTMCell):
    setups = []
    for label, I, H in CELLS if kind is nn.LSTMCell else GRU_CELLS:
        torch.manual_seed(0)
        eager = kind(I, H).eval()
        x, h, c = torch.randn(1, I), torch.randn(1, H), torch.randn(1, H)
        state = (h,) if kind is nn.GRUCell else (h, c)
        call = (x, h) if kind is nn.GRUCell else (x, (h, c))
        exact, approx = optimize(eager), optimize(eager, exact=False)
        assert exact.kernel == "aten" and approx.kernel == "native", (exact.kernel, approx.kernel)
        with torch.no_grad():
            expected = eager(*call)
            assert torch.equal(exact(*call)[0], expected[0])
            torch.testing.assert_close(approx(*call), expected, atol=1e-5, rtol=1e-5)
        variants = {"eager": lambda m=eager, a=call: m(*a), "aten": lambda m=exact, a=call: m(*a),
                    "native": lambda m=approx, a=call: m(*a)}
        if with_ort:
            graph, op, h_graph = ort_cell_sessions(eager, x, *state)
            torch.testing.assert_close(h_graph, expected if kind is nn.GRUCell else expected[0], atol=1e-5,
                                       rtol=1e-5)
            variants.update({"ORT cell graph": graph, "ORT LSTM op": op})
        setups.append((label, (I, H), variants))
    results = timed_runs({label: variants for label, _, variants in setups}, rounds, runs if with_ort else 1)
    rows = []
    for label, shape, _ in setups:
        times = results[label]
        eager = median(times, "eager")
        row = [label, ",".join(map(str, shape)), us(eager), us(median(times, "aten")),
               f"{eager / median(times, 'aten'):.2f}x", us(median(times, "native")),
               f"{eager / median(times, 'native'):.2f}x"]
        if with_ort:
            ratios = [t["native"] / min(t["ORT cell graph"], t["ORT LSTM op"]) for t in times]
            row += [us(median(times, "ORT cell graph")), us(median(times, "ORT LSTM op")),
                    spread(ratios)]
        rows.append(row)
    return rows


def decoder(rounds):
    torch.manual_seed(0)
    model = CellDecoder().eval()
    frames = torch.randn(DECODER_FRAMES, 1, 80)
    exact, approx = optimize(model), optimize(model, exact=False)
    assert kernels(exact) == "aten" and kernels(approx) == "native"
    with torch.no_grad():
        expected = model(frames)
        assert torch.equal(exact(frames), expected)
        torch.testing.assert_close(approx(frames), expected, atol=1e-5, rtol=1e-5)
        t = interleaved_medians({"eager": lambda: model(frames), "aten": lambda: exact(frames),
                                 "native": lambda: approx(frames)}, rounds=rounds)
    return [["Tacotron2-like decoder loop", f"2 LSTMCells (768,1024 and 1536,1024), {DECODER_FRAMES} frames",
             ms(t["eager"]), ms(t["aten"]), f"{t['eager'] / t['aten']:.2f}x", ms(t["native"]),
             f"{t['eager'] / t['native']:.2f}x"]]


# --- 2c. nn.GRU and nn.RNN ---------------------------------------------------------------------------

# (name, input_size, hidden_size, layers, bidirectional, batch, steps): streaming, then section 1's tagger
# and server shapes
GRUS = [
    ("GRU, one step", 80, 256, 2, False, 1, 1),
    ("GRU, 16-step chunk", 80, 256, 2, False, 1, 16),
    ("GRU, 16 streams, one step", 80, 256, 2, False, 16, 1),
    ("GRU, tagger shape", 128, 256, 2, True, 8, 50),
    ("GRU, server shape", 256, 512, 2, False, 16, 100),
]


# nn.RNN, as DeepSpeech-style acoustic models run it (relu; tanh at one shape), at the same shapes
RNNS = [
    ("RNN relu, one step", 80, 256, 2, False, 1, 1),
    ("RNN tanh, one step", 80, 256, 2, False, 1, 1),
    ("RNN relu, 16-step chunk", 80, 256, 2, False, 1, 16),
    ("RNN relu, 16 streams, one step", 80, 256, 2, False, 16, 1),
    ("RNN relu, tagger shape", 128, 256, 2, True, 8, 50),
    ("RNN relu, server shape", 256, 512, 2, False, 16, 100),
]


def one_state(rounds, runs, with_ort, shapes=GRUS):
    """nn.GRU (``GRUS``) or nn.RNN (``RNNS``, the nonlinearity in the label) against lstmopt --approx."""
    setups = []
    for label, I, H, layers, bidirectional, B, T in shapes:
        torch.manual_seed(0)
        make = nn.GRU if label.startswith("GRU") else functools.partial(
            nn.RNN, nonlinearity="tanh" if "tanh" in label else "relu")
        eager = make(I, H, num_layers=layers, bidirectional=bidirectional).eval()
        assert type(optimize(eager)) is type(eager)  # kept by default: no exact kernel
        approx = optimize(eager, exact=False)
        assert kernels(approx) == "native", kernels(approx)
        x, h = torch.randn(T, B, I), torch.randn(layers * (2 if bidirectional else 1), B, H)
        with torch.no_grad():
            expected = eager(x, h)
            torch.testing.assert_close(approx(x, h), expected, atol=1e-5, rtol=1e-5)
        variants = {"eager": lambda m=eager, a=(x, h): m(*a), "lstmopt": lambda m=approx, a=(x, h): m(*a)}
        if with_ort:
            run_ort, y = ort_session(eager, x, h)
            torch.testing.assert_close(y, expected[0], atol=1e-5, rtol=1e-5)
            variants["onnxruntime"] = run_ort
        setups.append((label, (I, H, layers, "bi" if bidirectional else "uni", B, T), variants))
    results = timed_runs({label: variants for label, _, variants in setups}, rounds, runs)
    rows = []
    for label, shape, _ in setups:
        times = results[label]
        row = [label, ",".join(map(str, shape)), us(median(times, "eager")), us(median(times, "lstmopt")),
               spread([t["eager"] / t["lstmopt"] for t in times])]
        if with_ort:
            row[3:3] = [us(median(times, "onnxruntime"))]
            row.append(spread([t["lstmopt"] / t["onnxruntime"] for t in times]))
        rows.append(row)
    return rows


# --- 2d. LSTMs with proj_size > 0 ---------------------------------------------------------------------

# (name, input_size, hidden_size, proj_size, layers, batch, steps)
PROJECTED = [
    ("LSTMP, one step", 80, 256, 128, 2, 1, 1),
    ("LSTMP, 16-step chunk", 80, 256, 128, 2, 1, 16),
    ("LSTMP, 16 streams, one step", 80, 256, 128, 2, 16, 1),
]


def projected(rounds, runs):
    setups = []
    for label, I, H, P, layers, B, T in PROJECTED:
        torch.manual_seed(0)
        eager = nn.LSTM(I, H, num_layers=layers, proj_size=P).eval()
        assert optimize(eager) is not eager and type(optimize(eager)) is nn.LSTM  # kept by default
        approx = optimize(eager, exact=False)
        assert kernels(approx) == "native", kernels(approx)
        x, h, c = torch.randn(T, B, I), torch.randn(layers, B, P), torch.randn(layers, B, H)
        with torch.no_grad():
            torch.testing.assert_close(approx(x, (h, c)), eager(x, (h, c)), atol=1e-5, rtol=1e-5)
        setups.append((label, (I, H, P, layers, B, T), {"eager": lambda m=eager, a=(x, (h, c)): m(*a),
                                                        "lstmopt": lambda m=approx, a=(x, (h, c)): m(*a)}))
    results = timed_runs({label: variants for label, _, variants in setups}, rounds, runs)
    rows = []
    for label, shape, _ in setups:
        times = results[label]
        speedups = [t["eager"] / t["lstmopt"] for t in times]
        rows.append([label, ",".join(map(str, shape)), us(median(times, "eager")), us(median(times, "lstmopt")),
                     spread(speedups)])
    return rows


# --- 3. variable-length batches -----------------------------------------------------------------------


def sequences(rounds):
    torch.manual_seed(0)
    model = Tagger().eval()
    g = torch.Generator().manual_seed(0)
    tokens, lengths = torch.randint(0, 5000, (8, 50), generator=g), torch.randint(10, 51, (8,), generator=g)
    lengths[0] = 50
    args = (tokens, lengths)
    default = optimize(model)
    best = optimize(model, autotune=[args], exact=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        expected = model(*args)
        variants = {"eager": lambda: model(*args), "lstmopt default": lambda: default(*args)}
        for fmt in ("torchscript", "pickle"):
            loaded = artifact(default, fmt, tmp)
            assert torch.equal(loaded(*args), expected)
            variants[f"its {fmt} artifact"] = lambda m=loaded: m(*args)
        torch.testing.assert_close(best(*args), expected, atol=1e-5, rtol=1e-5)
        variants["lstmopt fastest (approx)"] = lambda: best(*args)
        loaded = artifact(best, "torchscript", tmp)
        variants["its torchscript artifact (approx)"] = lambda m=loaded: m(*args)
        t = interleaved_medians(variants, rounds=rounds)
    sequence_kernel = best.lstm.sequence_kernel
    for variant, seconds in t.items():
        note = f"sequence kernel {sequence_kernel}" if "approx" in variant else (
            "nn.LSTM's path" if variant != "eager" else "")
        rows.append([variant, note, ms(seconds), f"{t['eager'] / seconds:.2f}x"])
    # autograd on: every call takes nn.LSTM's path
    x = torch.randn(8, 50, 128)
    lstm = model.lstm
    packed = optimize(lstm)
    t = interleaved_medians({"eager": lambda: lstm(x), "lstmopt": lambda: packed(x)}, rounds=rounds)
    rows.append(["BiLSTM alone, autograd on (eager vs lstmopt)", "nn.LSTM's path",
                 f"{ms(t['eager'])} vs {ms(t['lstmopt'])}", f"{t['eager'] / t['lstmopt']:.2f}x"])
    return rows


# --- 4. torch.compile and AOTInductor -----------------------------------------------------------------


def compiled(rounds):
    rows = []
    for features, hidden, layers, steps in [(40, 128, 1, 1), (80, 256, 2, 16)]:
        torch.manual_seed(0)
        model = Streamer(features, hidden, layers).eval()
        fast = optimize(model)
        x = torch.randn(1, steps, features)
        torch._dynamo.reset()
        compiled_original, compiled_fast = torch.compile(model), torch.compile(fast)
        with torch.no_grad():
            for other in (3, 7):  # new lengths must neither break nor recompile the packed path
                compiled_fast(torch.randn(1, other, features))
            assert torch.equal(compiled_fast(x), model(x))
            t = interleaved_medians({"compiled original": lambda: compiled_original(x),
                                     "compiled lstmopt": lambda: compiled_fast(x), "eager lstmopt": lambda: fast(x)},
                                    rounds=rounds)
        rows.append([f"{features},{hidden},{layers},uni,1,{steps}", ms(t["compiled original"]),
                     ms(t["compiled lstmopt"]), ms(t["eager lstmopt"]),
                     f"{t['compiled lstmopt'] / t['compiled original']:.2f}x",
                     f"{t['compiled lstmopt'] / t['eager lstmopt']:.2f}x"])
    return rows


def aot_inductor(rounds):
    rows = []
    torch.manual_seed(0)
    model = Streamer(40, 128, 1).eval()
    fast = optimize(model)
    x = torch.randn(1, 1, 40)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = {"eager lstmopt": lambda: fast(x)}
        for label, source in (("AOTInductor, original", model), ("AOTInductor, lstmopt's export", fast)):
            start = time.perf_counter()
            program = torch.export.export(source, (x,))
            package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(
                tmp, f"{len(times)}.pt2"))
            seconds = time.perf_counter() - start
            runner = torch._inductor.aoti_load_package(package)
            torch.testing.assert_close(runner(x), model(x), atol=1e-5, rtol=1e-5)
            times[label] = lambda r=runner: r(x)
            rows.append([label, f"{seconds:.1f} s"])
        t = interleaved_medians(times, rounds=rounds)
    for row in rows:
        row += [ms(t[row[0]]), f"{t[row[0]] / t['eager lstmopt']:.2f}x"]
    return rows, ms(t["eager lstmopt"])


# --- 6. deployment formats ---------------------------------------------------------------------------

# (label, features, hidden, layers, batch, steps) of a Streamer
DEPLOYED = [("one step", 80, 256, 2, 1, 1), ("16-step chunk", 80, 256, 2, 1, 16), ("batch", 80, 256, 2, 16, 50)]


def deployment(rounds, with_aoti):
    """Each artifact format loaded as a deployment loads it, against the optimized model in Python, for the
    default and the --approx kernels. pt2 and aoti are exported on a (2, 4) example, so that batch and time
    stay dynamic, and run on the timed shape."""
    formats = ["torchscript", "pickle", "pt2"] + (["aoti"] if with_aoti else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, features, hidden, layers, batch, steps in DEPLOYED:
            torch.manual_seed(0)
            model = Streamer(features, hidden, layers).eval()
            x, example = torch.randn(batch, steps, features), (torch.randn(2, 4, features),)
            for exact in (True, False):
                fast = optimize(model) if exact else optimize(model, exact=False, autotune=[(x,)])
                variants = {"lstmopt": lambda f=fast: f(x)}
                for fmt in formats:
                    loaded = artifact(fast, fmt, tmp, example)
                    torch.testing.assert_close(loaded(x), fast(x), atol=1e-6, rtol=1e-6)
                    variants[fmt] = lambda m=loaded: m(x)
                t = interleaved_medians(variants, rounds=rounds)
                rows.append([label, f"{features},{hidden},{layers},{batch},{steps}",
                             "default" if exact else f"--approx ({kernels(fast)})", us(t["lstmopt"])]
                            + [f"{t[fmt] / t['lstmopt']:.2f}x" for fmt in formats])
    return rows, formats


# --- 5. bf16, memory --------------------------------------------------------------------------------

def bf16_kernel() -> str:
    """What dtype=torch.bfloat16 runs on this CPU."""
    return ("oneDNN's bf16" if bf16_supported()
            else "no native bf16 in oneDNN here: lstmopt's native kernel on bf16 weights")


def bf16_row(config, rounds):
    I, H, layers, bidirectional, B, T = config
    torch.manual_seed(0)
    eager = nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional).eval()
    fast = optimize(eager, dtype=torch.bfloat16)
    x = torch.randn(T, B, I)
    with torch.no_grad():
        error = (fast(x)[0] - eager(x)[0]).abs().max().item()
        times = interleaved_medians({"eager fp32": lambda: eager(x), "bf16": lambda: fast(x)}, rounds=rounds)
    return times, error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs of the ONNX Runtime comparison (for its range)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and ORT) intra-op threads (default: torch's)")
    parser.add_argument("--onnxruntime", action="store_true", help="compare with ONNX Runtime (pip install onnxruntime)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile and AOTInductor (minutes)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--update-readme", type=Path, metavar="FILE",
                        help="replace the block between <!-- bench:start --> and <!-- bench:end --> with the tables")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    markdown = args.markdown or args.update_readme is not None
    native_state = (f"variant {native.variant()}" if native.available()
                    else f"unavailable: {native.unavailable_reason()}")
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
           f"{torch.backends.cpu.get_cpu_capability()}, native kernel {native_state}; medians of {args.rounds} "
           "interleaved rounds"]

    rows = []
    for config in CONFIGS:
        t, kernel = latency(config, args.rounds)
        rows.append([name(config), ms(t["eager"]), ms(t["module"]), ms(t["bare op"]),
                     f"{t['eager'] / t['module']:.2f}x", f"{(t['module'] / t['bare op'] - 1) * 100:+.1f}%",
                     f"{ms(t['fastest'])} ({kernel})", f"{t['eager'] / t['fastest']:.2f}x"])
    out += ["", "Latency, fp32: eager nn.LSTM, lstmopt's default kernel (bit-identical), its bare op, and lstmopt's "
            "fastest kernel (autotune, exact=False: approximate)",
            table(["(I,H,layers,dir,B,T)", "eager ms", "lstmopt ms", "bare op ms", "lstmopt vs eager",
                   "overhead vs bare op", "fastest ms (kernel)", "fastest vs eager"], rows, markdown)]

    if args.onnxruntime:
        import onnxruntime

        rows = streaming(args.rounds, args.runs)
        out += ["", f"Streaming, state carried between calls: lstmopt's fastest kernel against ONNX Runtime "
                f"{onnxruntime.__version__} (default session options, {torch.get_num_threads()} intra-op threads); "
                f"latency ratio, median and range over {args.runs} runs (below 1: lstmopt is faster)",
                table(["shape", "I,H,layers,B,T", "lstmopt kernel", "eager us", "ORT us", "lstmopt us",
                       "lstmopt / ORT"], rows, markdown)]
        rows = low_precision(args.rounds, args.runs)
        out += ["", f"Low precision, streaming, state carried: lstmopt int8 (optimize(m, dtype=torch.int8): int8 "
                f"weights, a scale per gate row, activations int16 per row, on the native kernel) against ONNX "
                f"Runtime's int8 LSTM (quantize_dynamic at its defaults: DynamicQuantizeLSTM); errors are the "
                f"largest absolute difference of the output from eager fp32 on the same inputs; ratios median and "
                f"range over {args.runs} runs (below 1: lstmopt is faster); bf16 is optimize(m, dtype=torch.bfloat16): "
                f"{bf16_kernel()}",
                table(["shape", "I,H,layers,B,T", "ORT fp32 us", "ORT int8 us", "ORT int8 error", "lstmopt fp32 us",
                       "lstmopt int8 us", "lstmopt int8 error", "lstmopt bf16 us",
                       "lstmopt bf16 error", "lstmopt int8 / ORT int8", "lstmopt fp32 / ORT fp32"], rows, markdown)]

    out += ["", f"torch.ao's dynamic-quantized modules (quantize_dynamic, qint8) against lstmopt's conversion of them "
            f"(optimize of the quantized model: the LSTM on its int8 weights, the GRU on its dequantized weights, on "
            f"the native kernel), state carried; errors against eager fp32 on the same inputs; latency ratio median "
            f"and range over {args.runs} runs (below 1: lstmopt is faster)",
            table(["module, shape", "I,H,layers,dir,B,T", "torch.ao us", "torch.ao error", "lstmopt us",
                   "lstmopt error", "lstmopt / torch.ao"], quantized(args.rounds, args.runs), markdown)]

    header = ["cell", "I,H", "eager us", "lstmopt default us", "vs eager", "lstmopt --approx us", "vs eager"]
    if args.onnxruntime:
        header += ["ORT cell graph us", "ORT LSTM op us", "--approx / faster ORT"]
    out += ["", "nn.LSTMCell, one step, batch 1, state given: lstmopt's default kernel (ATen's cell op called "
            "directly, bit-identical) and its native kernel (exact=False)"
            + (f" against ONNX Runtime on the exported cell and with its fused LSTM operator (ratio: median and "
               f"range over {args.runs} runs)" if args.onnxruntime else ""),
            table(header, cells(args.rounds, args.runs, args.onnxruntime), markdown),
            "", "A decoder rolling two LSTMCells frame by frame (batch 1), whole loop",
            table(["model", "cells", "eager ms", "lstmopt default ms", "vs eager", "lstmopt --approx ms",
                   "vs eager"], decoder(args.rounds), markdown)]

    out += ["", f"LSTMs with proj_size > 0 (LSTMP), state carried: kept by default (no exact kernel); with "
            f"exact=False (--approx) on lstmopt's native kernel, the projection fused; speedup over eager, median and "
            f"range over {args.runs} runs. No ONNX Runtime row: torch.onnx cannot export an LSTMP",
            table(["shape", "I,H,proj,layers,B,T", "eager us", "lstmopt --approx us", "speedup"],
                  projected(args.rounds, args.runs), markdown)]

    header = ["shape", "I,H,layers,dir,B,T", "eager us", "lstmopt --approx us", "speedup"]
    if args.onnxruntime:
        header[3:3] = ["ORT us"]
        header.append("lstmopt / ORT")
    out += ["", "nn.GRU, state carried: kept by default (no exact kernel: eager runs its own cell loop); with "
            "exact=False (--approx) on lstmopt's native kernel; speedup over eager"
            + (" and latency ratio to ONNX Runtime on the same export (below 1: lstmopt is faster)"
               if args.onnxruntime else "") + f", median and range over {args.runs} runs",
            table(header, one_state(args.rounds, args.runs, args.onnxruntime), markdown)]
    out += ["", "nn.RNN, state carried, as nn.GRU above",
            table(header, one_state(args.rounds, args.runs, args.onnxruntime, RNNS), markdown)]
    header = ["cell", "I,H", "eager us", "lstmopt default us", "vs eager", "lstmopt --approx us", "vs eager"]
    if args.onnxruntime:
        header += ["ORT cell graph us", "ORT GRU op us", "--approx / faster ORT"]
    out += ["", "nn.GRUCell, one step, batch 1, state given, as the LSTMCell above (default: ATen's gru_cell op "
            "called directly, bit-identical)",
            table(header, cells(args.rounds, args.runs, args.onnxruntime, nn.GRUCell), markdown)]

    out += ["", "Variable-length batches: a tagger (embedding, 2-layer BiLSTM I=128 H=256 on a PackedSequence, "
            "linear), batch 8, lengths 10-50; speedup over eager",
            table(["variant", "LSTM runs on", "ms", "vs eager"], sequences(args.rounds), markdown)]

    if args.compile:
        out += ["", "torch.compile of a model around an LSTM (linear, LSTM, linear), batch 1",
                table(["(I,H,layers,dir,B,T)", "compiled original ms", "compiled lstmopt ms", "eager lstmopt ms",
                       "compiled lstmopt / compiled original", "compiled lstmopt / eager lstmopt"],
                      compiled(args.rounds), markdown)]
        rows, eager_ms = aot_inductor(args.rounds)
        out += ["", f"AOTInductor (torch._inductor.aoti_compile_and_package) on the one-step model (40,128); "
                f"lstmopt run eagerly: {eager_ms} ms",
                table(["variant", "compile time", "latency ms", "vs eager lstmopt"], rows, markdown)]

    rows, formats = deployment(args.rounds, args.compile)
    out += ["", "Deployment formats: a Streamer (linear, 2-layer LSTM I=80 H=256, linear), each artifact loaded as a "
            "deployment loads it (torch.jit.load, torch.load, torch.export.load(...).module()"
            + (", torch._inductor.aoti_load_package" if args.compile else "") + "), latency relative to the "
            "optimized model run in Python",
            table(["shape", "I,H,layers,B,T", "kernels", "lstmopt us", *formats], rows, markdown)]

    rows = []
    for config in CONFIGS[2:]:
        t, error = bf16_row(config, args.rounds)
        rows.append([name(config), ms(t["eager fp32"]), ms(t["bf16"]), f"{t['eager fp32'] / t['bf16']:.2f}x",
                     f"{error:.1e}"])
    out += ["", f"bfloat16 (optimize(dtype=torch.bfloat16): {bf16_kernel()}) against eager fp32",
            table(["(I,H,layers,dir,B,T)", "eager fp32 ms", "lstmopt bf16 ms", "speedup", "max abs error vs fp32"],
                  rows, markdown)]

    memory, copy_s = memory_and_conversion()
    big = f"3-layer bidirectional LSTM, I={BIG['input_size']}, H={BIG['hidden_size']}"
    rows = [[f"{memory['original']['mb']:.0f} MB", f"{memory['optimized']['mb']:.0f} MB",
             f"{memory['optimized']['mb'] / memory['original']['mb']:.2f}x",
             f"{memory['optimized']['convert_s']:.2f} s", f"{copy_s:.2f} s"]]
    out += ["", f"{big}: resident memory after 3 inference calls (RSS growth, fresh processes) and conversion time",
            table(["original", "optimized", "ratio", "convert (inplace=True)", "convert (copying the model)"],
                  rows, markdown)]

    text = "\n".join(out)
    print(text)
    if args.update_readme is not None:
        readme = args.update_readme.read_text()
        pattern = re.compile(r"(<!-- bench:start -->\n).*?(\n<!-- bench:end -->)", re.S)
        if not pattern.search(readme):
            sys.exit(f"{args.update_readme} has no <!-- bench:start --> ... <!-- bench:end --> block")
        args.update_readme.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
