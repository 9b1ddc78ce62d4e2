"""Run lstmopt as a user would on models built from the classes of public packages; print what each got.

    pip install -c <(echo torch==2.13.0) speechbrain asteroid neuralforecast pyannote.audio torchaudio torch_geometric \
        darts flair
    python tools/real_models.py [--workdir DIR] [--markdown] [--only NAME]

Each model is built by a factory module written into the work directory from its package's own classes,
saved as a state dict (or, for a model torch.ao quantized, as the pickled module its users save) with
example inputs, and given to the installed ``lstmopt optimize`` as a user would (the default format, which
writes the first of TorchScript, pt2 and pickle that holds the model; ``--bench``), then once more with
``--autotune --approx``. Inputs are a file of examples, a function of the factory module (for inputs that
hold the package's own classes), or ``--input`` specs. A model whose package does not import here is listed
as such. The README's table of real models comes from this script. (torchaudio
wheels are built for one torch version; with another, remove its ``lib/*.so`` files and its pure-Python
model classes import, as in a pex deployment.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# flair's SequenceTagger on one-hot embeddings of a toy vocabulary: forward(sentence_tensor, lengths), embedded
# sentences in, tag features out
FLAIR_TAGGER = """
        from flair.data import Dictionary
        from flair.embeddings import OneHotEmbeddings
        from flair.models import SequenceTagger

        def tagger(embedding_length, hidden_size, use_crf):
            vocab = Dictionary()
            for word in "the cat sat on a mat".split():
                vocab.add_item(word)
            tags = Dictionary(add_unk=False)
            for tag in ["O", "S-PER", "B-LOC", "I-LOC", "E-LOC"]:
                tags.add_item(tag)
            return SequenceTagger(OneHotEmbeddings(vocab, field="text", embedding_length=embedding_length), tags,
                                  "ner", hidden_size=hidden_size, use_crf=use_crf).eval()
"""

# (name, package, factory source defining build(), the example inputs: an expression (``factory``: the factory
# module), or "function" (the factory's examples()), or a list of --input specs; extra optimize args; and how the
# model is saved: "state_dict" (with --factory), or "pickle" (build() returns the module its users torch.save,
# loaded with --trust))
# darts' forecasting models on nn.RNN (``model="RNN"``), fitted for an epoch; their modules take what darts'
# own predict loop hands them (captured as the examples). ``{}``: the model class and its own arguments.
DARTS_RNN = """
        import numpy as np
        from darts import TimeSeries
        from darts.models import BlockRNNModel, RNNModel

        def _fitted():
            t = np.arange(120, dtype=np.float32)
            series = TimeSeries.from_values(np.stack([np.sin(t / 5), np.cos(t / 7)], axis=1))
            model = {} hidden_dim=32, n_rnn_layers=2, n_epochs=1,
                random_state=0, pl_trainer_kwargs={{"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                                                   "enable_model_summary": False, "enable_checkpointing": False}})
            model.fit(series, verbose=False)
            return model, series

        def build():
            return _fitted()[0].model

        def examples():
            model, series = _fitted()
            captured = []
            handle = model.model.register_forward_pre_hook(lambda module, args: captured.append(args))
            model.predict(n=6, series=series, verbose=False)
            handle.remove()
            return captured[:2]
    """

MODELS = [
    ("speechbrain CRDNN (LSTM wrapper)", "speechbrain", """
        import speechbrain as sb
        from speechbrain.lobes.models.CRDNN import CRDNN

        def build():
            return CRDNN(input_shape=[None, None, 40], cnn_blocks=1, cnn_channels=(16,), rnn_class=sb.nnet.RNN.LSTM,
                         rnn_layers=2, rnn_neurons=64, dnn_blocks=1, dnn_neurons=64, time_pooling=False,
                         using_2d_pooling=False)
    """, "[(torch.randn(2, 50, 40),), (torch.randn(1, 20, 40),)]", []),
    ("speechbrain CRDNN (GRU wrapper)", "speechbrain", """
        import speechbrain as sb
        from speechbrain.lobes.models.CRDNN import CRDNN

        def build():
            return CRDNN(input_shape=[None, None, 40], cnn_blocks=1, cnn_channels=(16,), rnn_class=sb.nnet.RNN.GRU,
                         rnn_layers=2, rnn_neurons=64, dnn_blocks=1, dnn_neurons=64, time_pooling=False,
                         using_2d_pooling=False)
    """, "[(torch.randn(2, 50, 40),), (torch.randn(1, 20, 40),)]", []),
    ("speechbrain AttentionalRNNDecoder (GRUCells)", "speechbrain", """
        from speechbrain.nnet.RNN import AttentionalRNNDecoder

        def build():
            return AttentionalRNNDecoder(rnn_type="gru", attn_type="content", hidden_size=128, attn_dim=64,
                                         num_layers=2, enc_dim=96, input_size=32)
    """, "[(torch.randn(b, t, 32), torch.randn(b, 3 * t, 96), torch.ones(b)) for b, t in [(1, 20), (2, 10)]]",
     ["--format", "pickle"]),
    ("speechbrain AttentionalRNNDecoder (LSTMCells)", "speechbrain", """
        from speechbrain.nnet.RNN import AttentionalRNNDecoder

        def build():
            return AttentionalRNNDecoder(rnn_type="lstm", attn_type="location", hidden_size=128, attn_dim=64,
                                         num_layers=2, enc_dim=96, input_size=32, channels=8, kernel_size=5)
    """, "[(torch.randn(b, t, 32), torch.randn(b, 3 * t, 96), torch.ones(b)) for b, t in [(1, 20), (2, 10)]]",
     ["--format", "pickle"]),
    ("asteroid DPRNN-TasNet", "asteroid", """
        from asteroid.models import DPRNNTasNet

        def build():
            return DPRNNTasNet(n_src=2, n_repeats=2, bn_chan=32, hid_size=32, chunk_size=20, n_filters=32)
    """, "[(torch.randn(1, 1600),), (torch.randn(2, 800),)]", []),
    ("neuralforecast LSTM (LightningModule)", "neuralforecast", """
        from neuralforecast.models import LSTM

        def build():
            return LSTM(h=4, input_size=12, encoder_hidden_size=32, decoder_hidden_size=32, max_steps=1)
    """, """[({"insample_y": torch.randn(b, 12, 1), "futr_exog": torch.empty(b, 16, 0),
              "hist_exog": torch.empty(b, 12, 0), "stat_exog": torch.empty(b, 0)},) for b in (1, 8)]""", []),
    ("neuralforecast GRU (LightningModule)", "neuralforecast", """
        from neuralforecast.models import GRU

        def build():
            return GRU(h=4, input_size=12, encoder_hidden_size=32, decoder_hidden_size=32, max_steps=1)
    """, """[({"insample_y": torch.randn(b, 12, 1), "futr_exog": torch.empty(b, 16, 0),
              "hist_exog": torch.empty(b, 12, 0), "stat_exog": torch.empty(b, 0)},) for b in (1, 8)]""", []),
    ("pytorch-forecasting DeepAR (an nn.LSTM subclass)", "pytorch_forecasting", """
        import numpy as np
        import pandas as pd
        from pytorch_forecasting import DeepAR, TimeSeriesDataSet
        from pytorch_forecasting.data import GroupNormalizer

        def dataset():
            n = 60
            df = pd.DataFrame({"time_idx": np.tile(np.arange(n), 2), "series": np.repeat(["a", "b"], n),
                               "value": np.sin(np.arange(2 * n) / 5.0).astype("float32") + 2})
            return TimeSeriesDataSet(df, time_idx="time_idx", target="value", group_ids=["series"],
                                     max_encoder_length=24, max_prediction_length=6,
                                     time_varying_unknown_reals=["value"],
                                     target_normalizer=GroupNormalizer(groups=["series"]))

        def build():
            return DeepAR.from_dataset(dataset(), hidden_size=32, rnn_layers=2)

        def batches():  # what the model's own dataloader gives it: a dict of tensors per batch
            return [(x,) for x, _ in dataset().to_dataloader(train=False, batch_size=2)][:2]
    """, "factory.batches()", []),
    ("pyannote PyanNet (LightningModule)", "pyannote.audio", """
        from pyannote.audio.core.task import Problem, Resolution, Specifications
        from pyannote.audio.models.segmentation import PyanNet

        def build():
            model = PyanNet(sincnet={"stride": 10}, lstm={"hidden_size": 64, "num_layers": 2, "bidirectional": True})
            model.specifications = Specifications(problem=Problem.MULTI_LABEL_CLASSIFICATION,
                                                  resolution=Resolution.FRAME, duration=5.0, classes=["a", "b", "c"])
            model.build()
            return model
    """, "[(torch.randn(1, 1, 16000),), (torch.randn(2, 1, 8000),)]", []),
    ("flair SequenceTagger with CRF", "flair", FLAIR_TAGGER + """
        def build():
            return tagger(32, 64, use_crf=True)
    """, "[(torch.randn(2, 9, 32), torch.tensor([9, 5])), (torch.randn(4, 20, 32), torch.tensor([20, 17, 9, 3]))]",
     []),
    ("torchaudio Tacotron2 inference (prenet dropout on)", "torchaudio", """
        import torch
        from torchaudio.models import Tacotron2

        class Synthesizer(Tacotron2):
            def forward(self, tokens, lengths):
                return self.infer(tokens, lengths)[0]

        def build():
            return Synthesizer(n_symbol=40, symbol_embedding_dim=64, encoder_embedding_dim=64, encoder_n_convolution=1,
                               decoder_rnn_dim=128, attention_rnn_dim=128, attention_hidden_dim=64, prenet_dim=64,
                               postnet_n_convolution=1, postnet_embedding_dim=64, decoder_max_step=40)
    """, "[(torch.randint(1, 40, (1, 12)), torch.tensor([12]))]", ["--seed", "0"]),
    ("torchaudio WaveRNN (two GRUs)", "torchaudio", """
        from torchaudio.models import WaveRNN

        def build():
            return WaveRNN(upsample_scales=[2, 2], n_classes=16, hop_length=4, n_res_block=1, n_rnn=64, n_fc=64,
                           n_freq=20, n_hidden=16, n_output=16)
    """, "[(torch.randn(1, 1, 32), torch.randn(1, 1, 20, 12)), (torch.randn(2, 1, 64), torch.randn(2, 1, 20, 20))]",
     []),
    ("torch_geometric GatedGraphConv (a GRUCell)", "torch_geometric", """
        from torch_geometric.nn import GatedGraphConv

        def build():
            return GatedGraphConv(out_channels=32, num_layers=3)
    """, """[(torch.randn(n, 32), torch.randint(0, n, (2, 4 * n))) for n in (10, 25)]""", []),
    ("darts TFTModel's module (takes and returns dataclasses, Lightning metrics)", "darts", """
        import numpy as np
        from darts import TimeSeries
        from darts.models import TFTModel

        def _fitted():
            t = np.arange(120, dtype=np.float32)
            series = TimeSeries.from_values(np.stack([np.sin(t / 5), np.cos(t / 7)], axis=1))
            model = TFTModel(input_chunk_length=24, output_chunk_length=6, hidden_size=32, lstm_layers=2,
                             num_attention_heads=2, add_relative_index=True, n_epochs=1, random_state=0,
                             pl_trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                                                "enable_model_summary": False, "enable_checkpointing": False})
            model.fit(series, verbose=False)
            return model, series

        def build():
            return _fitted()[0].model

        def examples():  # what darts' own predict loop hands the module: its PLModuleInput dataclass
            model, series = _fitted()
            captured = []
            handle = model.model.register_forward_pre_hook(lambda module, args: captured.append(args))
            model.predict(n=6, series=series, verbose=False)
            handle.remove()
            return captured[:1]
    """, "function", []),
    ("darts RNNModel's module (model=\"RNN\": nn.RNN, tanh; a forecast step by step)", "darts", DARTS_RNN.format(
        "RNNModel(model='RNN', input_chunk_length=24, training_length=30,"), "function", []),
    ("darts BlockRNNModel's module (model=\"RNN\": nn.RNN, tanh)", "darts", DARTS_RNN.format(
        "BlockRNNModel(model='RNN', input_chunk_length=24, output_chunk_length=6,"), "function", []),
    ("flair LanguageModel, a character LM (its own __setstate__)", "flair", """
        from flair.data import Dictionary
        from flair.models import LanguageModel

        def build():
            characters = Dictionary(add_unk=True)
            for ch in "abcdefghijklmnopqrstuvwxyz .,\\n":
                characters.add_item(ch)
            return LanguageModel(characters, is_forward_lm=True, hidden_size=256, nlayers=1, embedding_size=64)
    """, ["int64[T=100,B=4]:0..31", "(float32[1,B,256], float32[1,B,256])"], []),
    ("flair SequenceTagger quantized by torch.ao (qint8 LSTM)", "flair", FLAIR_TAGGER + """
        def build():
            return torch.ao.quantization.quantize_dynamic(tagger(64, 128, use_crf=False), {torch.nn.LSTM, torch.nn.Linear},
                                                          dtype=torch.qint8)
    """, "[(torch.randn(4, 30, 64), torch.tensor([30, 22, 15, 7])), (torch.randn(1, 12, 64), torch.tensor([12]))]",
     [], "pickle"),
]


def run(args: list[str], cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    proc = subprocess.run([sys.executable, "-m", "lstmopt", *args, "--json"], cwd=cwd, env=env, capture_output=True,
                          text=True)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    report["exit_code"] = proc.returncode
    return report


def outcome(report: dict) -> str:
    if report["exit_code"] != 0:
        return f"exit {report['exit_code']}: {' '.join(str(report.get('error')).split())[:160]}"
    artifact = report.get("artifact") or {}
    how = f"{artifact.get('format', '?')} ({artifact.get('method', '?')})"
    packed = [m for m in report.get("modules", []) if m.get("packed")]
    kernels = sorted({m.get("kernel") for m in packed} | {m.get("sequence_kernel") for m in packed} - {None})
    verification = report.get("verification") or {}
    bench = report.get("benchmark") or {}
    speed = (f"{bench['speedup']:.2f}x ({bench.get('speedup_low', 0):.2f}-{bench.get('speedup_high', 0):.2f})"
             if bench.get("speedup") else "—")
    error = verification.get("max_abs_error")
    exact = "bit-exact" if error == 0 else ("not verified" if error is None else f"max err {error:.1e}")
    kinds = sorted({m.get("kind", "LSTM") for m in packed})
    return (f"{how}, {len(packed)} packed ({'/'.join(kinds) or 'none'}: {'/'.join(kernels) or '-'}), {exact}, "
            f"{speed}")


def try_model(name: str, package: str, factory: str, inputs, extra: list[str], saved: str, root: Path) -> list[str]:
    slug = "".join(c if c.isalnum() else "_" for c in name.split()[0] + "_" + name.split()[1]).lower()
    work = root / slug
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{slug}_factory.py").write_text("import torch\n" + textwrap.dedent(factory))
    model = "build()" if saved == "pickle" else "build().state_dict()"
    save = (f"import torch, warnings\nwarnings.filterwarnings('ignore')\nimport {slug}_factory as factory\n"
            f"from {slug}_factory import build\ntorch.manual_seed(0)\ntorch.save({model}, 'model.pt')\n"
            + (f"torch.save({inputs}, 'inputs.pt')\n" if isinstance(inputs, str) and inputs != "function" else ""))
    proc = subprocess.run([sys.executable, "-c", save], cwd=work, env=dict(os.environ, PYTHONPATH=str(work)),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return [name, package, f"not built here: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}", "", ""]
    loading = ["--trust"] if saved == "pickle" else ["--factory", f"{slug}_factory:build"]
    given = ([arg for spec in inputs for arg in ("--input", spec)] if isinstance(inputs, list) else
             ["--example-inputs", f"{slug}_factory:examples" if inputs == "function" else "inputs.pt"])
    base = ["optimize", "model.pt", *loading, *given, "--bench", "--force"]
    default = run([*base, "-o", "out.ts.pt"], work)
    row = [name, package, outcome(default)]
    if extra and default["exit_code"] != 0:  # the documented way through (e.g. --seed for a model that samples)
        row[2] += f"; with {' '.join(extra)}: " + outcome(run([*base, *extra, "-o", "out.ts.pt"], work))
    row.append(outcome(run([*base, *extra, "--autotune", "--approx", "-o", "approx.ts.pt"], work)))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to write the models (default: a temporary directory)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--only", default="", help="only the models whose name contains this")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lstmopt-real-"))
    header = ["model", "package", "default (--bench)", "--autotune --approx"]
    rows = [try_model(*entry, *(() if len(entry) > 5 else ("state_dict",)), root)
            for entry in MODELS if args.only.lower() in entry[0].lower()]
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in rows:
            print(" :: ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
