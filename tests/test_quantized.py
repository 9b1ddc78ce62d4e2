"""torch.ao's dynamic-quantized recurrent modules (lstmopt/rewrite/quantized.py): recognized, turned into lstmopt's
on their own weights, measured against the quantized original and verified within what was measured."""

import json
import warnings

import pytest
import torch
from torch import nn

import package_patterns
from conftest import invoke, needs_native
from lstmopt import optimize, plan
from lstmopt.modules.cell import PackedGRUCell, PackedLSTMCell
from lstmopt.modules.gru import PackedGRU
from lstmopt.modules.lstm import PackedLSTM
from lstmopt.rewrite.quantized import dequantized

pytestmark = [needs_native, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(params=["qint8", "float16"])
def quantized(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return package_patterns.build_quantized_tagger(request.param), request.param


def test_every_quantized_kind_is_recognized_with_what_lstmopt_runs_instead(quantized):
    model, dtype = quantized
    decisions = {d.name: d for d in plan(model)}
    assert {name: (d.kind, d.dtype, d.packed, d.exact) for name, d in decisions.items()} == {
        "lstm": ("LSTM", dtype, True, False), "gru": ("GRU", dtype, True, False),
        "lstm_cell": ("LSTMCell", dtype, True, False), "gru_cell": ("GRUCell", dtype, True, False)}
    lstm = decisions["lstm"]
    if dtype == "qint8":
        assert (lstm.packed_dtype, lstm.kernel, lstm.sequence_kernel) == ("int8", "native", "native")
        assert "int8 weights, requantized per gate row" in lstm.reason
    else:
        assert (lstm.packed_dtype, lstm.kernel) == ("float32", "onednn")
    assert all(f"torch.ao dynamic-quantized ({dtype})" in d.reason for d in decisions.values())


def test_the_dequantized_weights_are_the_quantized_ones_exactly(quantized):
    model, _ = quantized
    plain = dequantized(model.lstm)
    for name, weight in model.lstm.get_weight().items():
        expected = weight.dequantize() if weight.is_quantized else weight
        assert torch.equal(getattr(plain, name), expected)


def test_optimized_modules_run_lstmopts_kernels_and_never_torchs_own(quantized, monkeypatch):
    model, dtype = quantized
    fast = optimize(model)
    assert type(fast.lstm) is PackedLSTM and type(fast.gru) is PackedGRU
    assert type(fast.lstm_cell) is PackedLSTMCell and type(fast.gru_cell) is PackedGRUCell
    assert fast.lstm.native_weights == ("int8" if dtype == "qint8" else "float32")
    stock = []
    for op in ("lstm", "gru", "lstm_cell", "gru_cell"):
        original = getattr(torch._VF, op)
        monkeypatch.setattr(torch._VF, op, lambda *a, op=op, original=original, **k: stock.append(op) or original(*a, **k))
    x = torch.randn(3, 9, 6)
    with torch.inference_mode():
        got, want = fast(x), model(x)
    assert stock == []  # every recurrent module ran lstmopt's kernel
    # torch.ao also rounds activations to 8 bits (qint8): the artifact is close to it, not equal
    assert (got - want).abs().max() < (0.05 if dtype == "qint8" else 1e-4)


def test_optimize_writes_a_verified_artifact_whose_error_against_the_quantized_model_is_reported(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(package_patterns.build_quantized_tagger("qint8"), "q.pt")
    result = invoke("optimize", "q.pt", "--trust", "-o", "out.pt", "--input-shape", "2,9,6", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(m["name"], m["dtype"], m["packed_dtype"]) for m in report["modules"]] == [
        ("lstm", "qint8", "int8"), ("gru", "qint8", "float32"), ("lstm_cell", "qint8", "float32"),
        ("gru_cell", "qint8", "float32")]
    measured = report["low_precision"]
    assert set(measured["lstms"]) == {"lstm", "gru", "lstm_cell", "gru_cell"} and 0 < measured["atol"] < 0.5
    assert report["verification"]["ok"] and report["verification"]["atol"] == measured["atol"]
    assert report["verification"]["max_abs_error"] > 0  # compared with the quantized original, not itself
    assert all(m["class"].startswith("lstmopt.") for m in report["verification"]["artifact_holds"]["modules"].values())


def test_inspect_names_torch_aos_modules_and_counts_their_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(package_patterns.build_quantized_tagger("qint8"), "q.pt")
    result = invoke("inspect", "q.pt", "--trust", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    lstm = next(m for m in report["modules"] if m["name"] == "lstm")
    assert lstm["parameters"] == sum(p.numel() for p in nn.LSTM(6, 16, 2, bidirectional=True).parameters())
    shown = invoke("inspect", "q.pt", "--trust")
    assert "lstm: DynamicQuantizedLSTM" in shown.stdout and "packed int8" in shown.stdout
