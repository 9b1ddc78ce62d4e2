"""Optimized models work on PyTorch's supported paths: torch.export (one aten.mkldnn_rnn_layer per layer and
direction on the dense weights, dynamic batch and time) and torch.compile (the packed path stays eager,
nothing of lstmopt's is compiled, new sequence lengths compile nothing new)."""

import pytest
import torch
from torch import nn
from torch.export import Dim

from lstmopt import optimize
from models import build_speech_encoder

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=3, bias=False, batch_first=True)]


def _lstm_and_inputs(config, with_state, batch, steps):
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, **config).eval()
    x = torch.randn(batch, steps, 8) if config.get("batch_first") else torch.randn(steps, batch, 8)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    hx = (torch.randn(states, batch, 16), torch.randn(states, batch, 16)) if with_state else None
    return lstm, x, hx


def _ops(program, name):
    return [n for n in program.graph.nodes if n.op == "call_function" and name in str(n.target)]


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("config", CONFIGS, ids=["uni", "bi2", "3layers_nobias_batch_first"])
def test_export_with_dynamic_batch_and_time_is_exact_at_other_shapes(tmp_path, config, with_state):
    lstm, x, hx = _lstm_and_inputs(config, with_state, batch=3, steps=10)
    batch, time = Dim("batch"), Dim("time")
    dims = {0: batch, 1: time} if config.get("batch_first") else {0: time, 1: batch}
    args = (x,) if hx is None else (x, hx)
    shapes = {"input": dims} if hx is None else {"input": dims, "hx": ({1: batch}, {1: batch})}
    program = torch.export.export(optimize(lstm), args, dynamic_shapes=shapes)
    directions = 2 if lstm.bidirectional else 1
    assert len(_ops(program, "mkldnn_rnn_layer")) == lstm.num_layers * directions
    assert not _ops(program, "aten.lstm")
    torch.export.save(program, tmp_path / "lstm.pt2")
    loaded = torch.export.load(tmp_path / "lstm.pt2").module()
    with torch.no_grad():
        for b, t in [(1, 1), (5, 23), (2, 3)]:
            _, x2, hx2 = _lstm_and_inputs(config, with_state, batch=b, steps=t)
            expected, actual = lstm(x2, hx2), loaded(*((x2,) if hx2 is None else (x2, hx2)))
            assert torch.equal(actual[0], expected[0])
            assert torch.equal(actual[1][0], expected[1][0]) and torch.equal(actual[1][1], expected[1][1])


def test_export_of_a_whole_model_around_the_lstm(tmp_path):
    model = build_speech_encoder().eval()
    x = torch.randn(4, 40, 40)
    program = torch.export.export(optimize(model), (x,), dynamic_shapes={"frames": {0: Dim("batch"),
                                                                                   1: Dim("time", min=4)}})
    assert len(_ops(program, "mkldnn_rnn_layer")) == 6 and not _ops(program, "aten.lstm")
    torch.export.save(program, tmp_path / "encoder.pt2")
    loaded = torch.export.load(tmp_path / "encoder.pt2").module()
    with torch.no_grad():
        for b, t in [(1, 9), (3, 77)]:
            frames = torch.randn(b, t, 40)
            assert torch.equal(loaded(frames), model(frames))


def test_the_original_cannot_export_a_dynamic_length_but_the_optimized_model_can():
    lstm, x, _ = _lstm_and_inputs({}, False, batch=2, steps=10)
    shapes = {"input": {0: Dim("time")}}
    with pytest.raises(Exception, match="time"):
        torch.export.export(lstm, (x,), dynamic_shapes=shapes)
    torch.export.export(optimize(lstm), (x,), dynamic_shapes=shapes)


class Tagger(nn.Module):
    """The LSTM inside a block, so that torch.compile breaks its graph at the call and compiles the rest."""

    def __init__(self):
        super().__init__()
        self.front = nn.Sequential(nn.Linear(40, 32), nn.ReLU())
        self.block = nn.ModuleDict({"lstm": nn.LSTM(32, 64, num_layers=2, batch_first=True)})
        self.head = nn.Linear(64, 5)

    def run_block(self, x):
        return self.block["lstm"](x)[0]

    def forward(self, x):
        return self.head(self.run_block(self.front(x))).log_softmax(-1)


def _compile_and_count(model, lengths):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    with torch.no_grad():
        outputs = [compiled(torch.randn(2, t, 40, generator=torch.Generator().manual_seed(t))) for t in lengths]
    return outputs, counters["stats"]["unique_graphs"], compiled


def test_compiled_optimized_model_matches_the_compiled_original_and_compiles_the_same_graphs(monkeypatch):
    torch.manual_seed(0)
    model = Tagger().eval()
    fast = optimize(model)
    lengths = [5, 9, 17, 1, 40]
    expected, graphs_original, _ = _compile_and_count(model, lengths)
    calls = []
    op = torch.mkldnn_rnn_layer
    monkeypatch.setattr(torch, "mkldnn_rnn_layer", lambda *args: calls.append(args[1].is_mkldnn) or op(*args))
    actual, graphs_optimized, compiled = _compile_and_count(fast, lengths)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    assert calls and all(calls)  # the packed op ran, on packs
    assert graphs_optimized == graphs_original  # nothing of lstmopt's was compiled; the rest was
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for t in (3, 64, 7):  # new sequence lengths compile nothing new
            compiled(torch.randn(2, t, 40))
