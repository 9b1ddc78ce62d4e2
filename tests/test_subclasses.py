"""Subclasses of nn.LSTM: one whose forward calls nn.LSTM's (``super().forward``) is packed under its own
code, which keeps running; one that reimplements forward is kept, with the reason."""

import abc
import copy
import io
import json

import torch
from torch import nn

from conftest import invoke
from lstmopt import PackedLSTM, optimize, plan
from models import LengthAwareLSTM, OwnLoopLSTM, build_subclass_forecaster


class Flexible(abc.ABC, nn.RNNBase):
    """pytorch-forecasting's shape: an abstract mixin on nn.RNNBase owns forward and calls super()."""

    @abc.abstractmethod
    def zero_state(self, x): ...

    def forward(self, x, hx=None, lengths=None):
        if lengths is not None and int(lengths.max()) == 0:
            return torch.zeros_like(x[..., :1]).expand(*x.shape[:-1], self.hidden_size), self.zero_state(x)
        return super().forward(x, hx=hx)


class FlexibleLSTM(Flexible, nn.LSTM):
    def zero_state(self, x):
        zeros = torch.zeros(self.num_layers, x.size(0), self.hidden_size)
        return zeros, zeros


class Outer:
    class Nested(nn.LSTM):
        def forward(self, x, hx=None):
            out, state = super().forward(x, hx)
            return out + 1, state


def test_a_subclass_calling_super_forward_is_packed_and_runs_its_own_code(kernel_calls):
    lstm = LengthAwareLSTM(5, 16, num_layers=2, batch_first=True).eval()
    fast = optimize(lstm)
    assert isinstance(fast, LengthAwareLSTM) and isinstance(fast, PackedLSTM) and type(fast).__name__ == "LengthAwareLSTM"
    x, lengths = torch.randn(3, 6, 5), torch.tensor([6, 2, 4])
    with torch.no_grad():
        for args in [(x,), (x, None, lengths)]:
            expected, actual = lstm(*args), fast(*args)
            assert torch.equal(actual[0], expected[0]) and all(map(torch.equal, actual[1], expected[1]))
    assert kernel_calls["onednn"] == 2  # the tensor call, one op per layer; the lengths call took PackedSequences
    assert list(fast.state_dict()) == list(lstm.state_dict())


def test_the_decision_says_whose_forward_runs():
    (decision,) = plan(LengthAwareLSTM(5, 16))
    assert decision.packed and decision.exact
    assert decision.reason == "bit-identical to eager; LengthAwareLSTM's own forward runs, calling the packed LSTM"


def test_a_subclass_that_reimplements_forward_is_kept_with_the_reason():
    (decision,) = plan(OwnLoopLSTM(5, 16, batch_first=True))
    assert not decision.packed
    assert decision.reason.startswith("OwnLoopLSTM subclasses nn.LSTM with a forward that does not call nn.LSTM's")
    assert type(optimize(OwnLoopLSTM(5, 16))) is OwnLoopLSTM


def test_a_forward_inherited_from_an_abstract_mixin_counts():
    lstm = FlexibleLSTM(4, 8, batch_first=True).eval()
    fast = optimize(lstm)
    assert isinstance(fast, PackedLSTM)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(fast(x)[0], lstm(x)[0])
        assert torch.equal(fast(x, lengths=torch.zeros(2))[0], torch.zeros(2, 3, 8))


def test_a_packed_subclass_pickles_deep_copies_and_loads_state_dicts():
    for lstm in (LengthAwareLSTM(5, 16).eval(), Outer.Nested(5, 16).eval(), FlexibleLSTM(5, 16).eval()):
        fast = optimize(lstm)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        x = torch.randn(4, 2, 5)
        with torch.no_grad():
            for other in (loaded, copy.deepcopy(fast)):
                assert type(other) is type(fast)
                assert torch.equal(other(x)[0], lstm(x)[0])
        retrained = type(lstm)(5, 16).eval()
        loaded.load_state_dict(retrained.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(x)[0], retrained(x)[0])


def test_the_cli_packs_a_subclass_in_both_formats_and_keeps_the_reimplementing_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_subclass_forecaster().state_dict(), "w.pt")
    for format in ("torchscript", "pickle"):
        result = invoke("optimize", "w.pt", "-o", f"out.{format}", "--format", format, "--factory",
                        "models:build_subclass_forecaster", "--input-shape", "2,9,3", "--json")
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        lstms = {d["name"]: d for d in report["modules"]}
        assert lstms["encoder"]["packed"] and not lstms["refine"]["packed"]
        assert report["verification"]["ok"]
    archive = torch.jit.load("out.torchscript")
    # Traced: the subclass's forward is recorded around a scripted LSTM that holds its weights.
    assert "scripted_lstm" in archive.encoder.code
    assert all(layer.is_packed() for layer in archive.encoder.scripted_lstm.packed_layers.children())
    assert "encoder.scripted_lstm.weight_ih_l0" in archive.state_dict()
    assert "encoder.weight_ih_l0" not in archive.state_dict()
    x = torch.randn(3, 5, 3)
    with torch.no_grad():
        assert torch.equal(archive(x), build_subclass_forecaster().eval()(x))


def test_a_subclass_with_an_abstract_mixin_is_traced_into_an_artifact():
    # pytorch-forecasting's DeepAR: Python refuses to re-class an instance of a class with abc.ABC among its
    # bases into one without (another layout), so tracing copies the module into its scripted twin instead.
    from lstmopt.artifacts.tracing import trace_with_scripted_lstms

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FlexibleLSTM(4, 8, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    model = Encoder().eval()
    x = torch.randn(2, 3, 4)
    traced, _ = trace_with_scripted_lstms(optimize(model), (x,))
    assert "scripted_lstm" in traced.lstm.code
    with torch.no_grad():
        for steps in (3, 7):
            x = torch.randn(2, steps, 4)
            assert torch.equal(traced(x), model(x))
