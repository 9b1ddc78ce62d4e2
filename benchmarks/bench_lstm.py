"""lstmopt's numbers, all measured side by side in one run and reported as ratios.

    python benchmarks/bench_lstm.py [--rounds 21] [--threads N] [--onnxruntime] [--markdown]
                                    [--update-readme README.md]

1. Latency, fp32 (medians of interleaved rounds): eager nn.LSTM; PackedLSTM (the default "onednn" kernel);
   the bare op on the same packed weights (``torch.mkldnn_rnn_layer``, the fastest binding, nothing
   checked); the single-step "cell" kernel where T=1; ONNX Runtime's LSTM when ``--onnxruntime`` is given
   and onnxruntime is installed. Ratios: speedups over eager, the module's overhead over the bare op, and
   lstmopt's best kernel against ONNX Runtime.
2. bf16: PackedLSTM in bfloat16 against eager fp32, with its max abs error against the fp32 output.
3. Conversion time and resident memory (RSS, fresh processes) of a 3-layer bidirectional LSTM with
   I=512, H=1024, optimized vs original.
"""

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lstmopt import PackedLSTM, optimize
from lstmopt.packing import bf16_supported
from lstmopt.timing import interleaved_medians

# (input_size, hidden_size, layers, bidirectional, batch, steps)
CONFIGS = [
    (40, 128, 1, False, 1, 1),
    (80, 256, 2, False, 1, 16),
    (128, 256, 2, True, 8, 50),
    (256, 512, 2, False, 16, 100),
]
BIG = dict(input_size=512, hidden_size=1024, num_layers=3, bidirectional=True)


def name(config) -> str:
    I, H, layers, bidirectional, B, T = config
    return f"{I},{H},{layers},{'bi' if bidirectional else 'uni'},{B},{T}"


def bare_op(packed: PackedLSTM, x: torch.Tensor):
    """The floor: the op per layer and direction on laid-out input, no checks, states preallocated."""
    zeros = torch.zeros(x.size(1), packed.hidden_size)
    args = list(packed._kernel_args)
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


def onnxruntime_session(lstm: nn.LSTM, x: torch.Tensor):
    """ONNX Runtime running the exported LSTM (its native LSTM kernel), or None if unavailable."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    buf = io.BytesIO()
    torch.onnx.export(lstm, (x,), buf, input_names=["x"], output_names=["y", "h", "c"], dynamo=False,
                      dynamic_axes={"x": {0: "T", 1: "B"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ORT's idle threads spin by default, which would steal the CPU from the torch variants timed between
    # its calls; the interleaved comparison needs them to sleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def latency(config, rounds, use_ort):
    I, H, layers, bidirectional, B, T = config
    torch.manual_seed(0)
    eager = nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional).eval()
    packed = PackedLSTM.from_lstm(eager).eval()
    x = torch.randn(T, B, I)
    variants = {"eager": lambda: eager(x), "module": lambda: packed(x), "bare op": bare_op(packed, x)}
    with torch.no_grad():
        assert torch.equal(eager(x)[0], packed(x)[0]) and torch.equal(variants["bare op"](), eager(x)[0])
        if T == 1:
            cell = PackedLSTM.from_lstm(eager).eval()
            cell.use_kernel("cell")
            torch.testing.assert_close(cell(x)[0], eager(x)[0], atol=1e-6, rtol=1e-6)
            variants["cell"] = lambda: cell(x)
        if use_ort:
            session = onnxruntime_session(eager, x)
            if session is not None:
                variants["onnxruntime"] = session
        return interleaved_medians(variants, rounds=rounds)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--onnxruntime", action="store_true", help="also time ONNX Runtime (if installed)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--update-readme", type=Path, metavar="README",
                        help="replace the block between <!-- bench:start --> and <!-- bench:end --> with the tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    markdown = args.markdown or args.update_readme is not None
    ms = lambda seconds: f"{seconds * 1e3:.3f}"  # noqa: E731
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
           f"{torch.backends.cpu.get_cpu_capability()}; median of {args.rounds} interleaved rounds"]

    header = ["(I,H,layers,dir,B,T)", "eager ms", "lstmopt ms", "bare op ms", "lstmopt vs eager",
              "bare op vs eager", "module overhead vs bare op", "cell kernel (T=1)"]
    if args.onnxruntime:
        header += ["ONNX Runtime ms", "best lstmopt vs ORT"]
    rows = []
    for config in CONFIGS:
        t = latency(config, args.rounds, args.onnxruntime)
        row = [name(config), ms(t["eager"]), ms(t["module"]), ms(t["bare op"]), f"{t['eager'] / t['module']:.2f}x",
               f"{t['eager'] / t['bare op']:.2f}x", f"{(t['module'] / t['bare op'] - 1) * 100:+.1f}%",
               f"{ms(t['cell'])} ms = {t['eager'] / t['cell']:.2f}x" if "cell" in t else "n/a"]
        if args.onnxruntime:
            best = min(t["module"], t.get("cell", float("inf")))
            row += [ms(t["onnxruntime"]), f"{t['onnxruntime'] / best:.2f}x"] if "onnxruntime" in t else ["n/a"] * 2
        rows.append(row)
    out += ["", "Latency, fp32 (lstmopt = PackedLSTM with its default, bit-identical onednn kernel)",
            table(header, rows, markdown)]

    if bf16_supported():
        rows = []
        for config in CONFIGS[2:]:
            t, error = bf16_row(config, args.rounds)
            rows.append([name(config), ms(t["eager fp32"]), ms(t["bf16"]), f"{t['eager fp32'] / t['bf16']:.2f}x",
                         f"{error:.1e}"])
        out += ["", "bfloat16 (optimize(dtype=torch.bfloat16)) against eager fp32",
                table(["(I,H,layers,dir,B,T)", "eager fp32 ms", "lstmopt bf16 ms", "speedup", "max abs error vs fp32"],
                      rows, markdown)]
    else:
        out += ["", "bfloat16: skipped, this CPU has no native bf16 support in oneDNN"]

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
