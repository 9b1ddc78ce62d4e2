"""Low precision on the native kernel: ``optimize(m, dtype=torch.int8)`` / ``--dtype int8``, and
``dtype=torch.bfloat16`` where oneDNN has no native bf16.

What int8 means is an LSTM on the weights rounded to int8 with a scale per gate row and part (input,
recurrent); bf16, on the weights rounded to bf16. The kernel must compute that LSTM (for int8, to the
int16 rounding of its activations), and the error the rounding makes against fp32 is reported, bounded
here on PyTorch's initial weights.
"""

import io
import re
import json

import jsonschema

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from lstmopt import PackedLSTM, optimize, plan
from lstmopt.kernels import table as kernel_table
from lstmopt.rewrite import autotune as autotuning
from lstmopt.rewrite.autotune import autotune
from lstmopt.rewrite.swap import with_kernels
from lstmopt.rewrite.timing import Comparison, Ratio
from lstmopt.job.low_precision import TOLERANCE_FACTOR, measure
from lstmopt.job.verification import BF16_TOLERANCE
from lstmopt.reporting.report import schema
from conftest import invoke, needs_native
from models import rounded

pytestmark = needs_native

# Against eager on the rounded weights: what is left is the activations' int16 rounding (~1e-5 of each
# row's largest value per step; measured up to 2e-5 over 300 steps).
TO_ROUNDED = 2e-4
# Against fp32, on PyTorch's initial weights and N(0, 1) inputs and states: measured up to 4e-3 (int8)
# and 6e-4 (bf16).
TO_FP32 = 2e-2
# bf16 against eager on the rounded weights: the sums run in another order (as the fp32 native kernel's).
BF16_TO_ROUNDED = 1e-5


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without native bf16 in oneDNN, where dtype=torch.bfloat16 runs on the native kernel."""
    monkeypatch.setattr("lstmopt.rewrite.swap.bf16_supported", lambda: False)
    monkeypatch.setattr("lstmopt.rewrite.kinds.lstm.bf16_supported", lambda: False)


def outputs(result):
    y, (h, c) = result
    return [getattr(y, "data", y), h, c]


def max_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(outputs(a), outputs(b)))


@st.composite
def configs(draw):
    lstm = dict(input_size=draw(st.sampled_from([1, 7, 16, 33])), hidden_size=draw(st.sampled_from([1, 15, 16, 40])),
                num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
                batch_first=draw(st.booleans()))
    return lstm, draw(st.integers(1, 9)), draw(st.sampled_from([1, 2, 17])), draw(st.booleans()), draw(st.integers(0, 999))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_int8_computes_the_lstm_on_its_rounded_weights_within_the_fp32_bound(case):
    config, batch, steps, with_state, seed = case
    torch.manual_seed(seed)
    lstm = nn.LSTM(**config).eval()
    fast = optimize(lstm, dtype=torch.int8)
    shape = (batch, steps, config["input_size"]) if config["batch_first"] else (steps, batch, config["input_size"])
    x = torch.randn(shape)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    hx = (torch.randn(states, batch, config["hidden_size"]), torch.randn(states, batch, config["hidden_size"]))
    args = (x, hx) if with_state else (x,)
    with torch.no_grad():
        result = fast(*args)
        assert max_error(result, rounded(lstm)(*args)) < TO_ROUNDED
        assert max_error(result, lstm(*args)) < TO_FP32


def test_optimize_int8_runs_the_native_kernel_on_int8_packs_and_keeps_fp32_parameters():
    lstm = nn.LSTM(8, 32, num_layers=2)
    fast = optimize(lstm, dtype=torch.int8)
    assert isinstance(fast, PackedLSTM) and fast.native_weights == "int8"
    assert fast.kernel == fast.sequence_kernel == "native"
    assert fast.native_packs.weights[0].dtype == torch.int8
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert fast.state_dict().keys() == lstm.state_dict().keys()
    (decision,) = plan(fast)
    assert decision.packed_dtype == "int8" and not decision.exact
    assert "native_weights=int8" in repr(fast)


def test_lstms_int8_cannot_serve_are_kept_and_say_why():
    model = nn.ModuleDict({"plain": nn.LSTM(4, 8), "projected": nn.LSTM(4, 8, proj_size=3)})
    decisions = {d.name: d for d in plan(model, dtype=torch.int8)}
    assert decisions["plain"].packed and decisions["plain"].packed_dtype == "int8"
    assert not decisions["projected"].packed
    assert decisions["projected"].reason == "not int8: int8 serves LSTMs without a projection (proj_size=0)"
    assert type(optimize(model, dtype=torch.int8)["projected"]) is nn.LSTM


def test_packed_sequences_run_on_int8_as_tensors_do():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 24, bidirectional=True).eval()
    fast = optimize(lstm, dtype=torch.int8)
    sequences = [torch.randn(n, 5) for n in (9, 4, 1)]
    with torch.no_grad():
        packed = fast(pack_sequence(sequences))
        assert max_error(packed, rounded(lstm)(pack_sequence(sequences))) < TO_ROUNDED
        alone = fast(sequences[1][:, None])
    assert torch.allclose(packed[1][0][:, 1], alone[1][0][:, 0], atol=TO_ROUNDED)


def test_each_row_of_a_batch_gets_exactly_what_it_gets_alone():
    # int32 sums are exact and the scaling is per row: the batch's tiling and thread split change nothing
    torch.manual_seed(1)
    fast = optimize(nn.LSTM(80, 256, num_layers=2).eval(), dtype=torch.int8)
    x = torch.randn(1, 16, 80)
    with torch.no_grad():
        batched = fast(x)[0]
        for row in (0, 7, 15):
            assert torch.equal(batched[:, row], fast(x[:, row:row + 1])[0][:, 0])


def test_nan_in_the_input_reaches_the_output_as_in_fp32():
    fast = optimize(nn.LSTM(3, 16).eval(), dtype=torch.int8)
    x = torch.randn(4, 2, 3)
    x[1, 0, 2] = float("nan")
    with torch.no_grad():
        y = fast(x)[0]
    assert y[1:, 0].isnan().all() and not y[:, 1].isnan().any()


def test_new_and_edited_weights_repack_as_int8():
    torch.manual_seed(2)
    fast = optimize(nn.LSTM(6, 20).eval(), dtype=torch.int8)
    other = nn.LSTM(6, 20).eval()
    x = torch.randn(3, 2, 6)
    with torch.no_grad():
        fast.load_state_dict(other.state_dict())
        assert max_error(fast(x), rounded(other)(x)) < TO_ROUNDED
        fast.weight_hh_l0.mul_(0.5)
        other.weight_hh_l0.mul_(0.5)
        assert max_error(fast(x), rounded(other)(x)) < TO_ROUNDED
    assert fast.native_packs.weights[0].dtype == torch.int8


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_artifacts_store_fp32_weights_and_pack_int8_again_when_loaded(fmt):
    torch.manual_seed(3)
    fast = optimize(nn.Sequential(nn.LSTM(10, 32, num_layers=2)).eval(), dtype=torch.int8)
    buffer = io.BytesIO()
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(fast), buffer)
    else:
        torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer) if fmt == "torchscript" else torch.load(buffer, weights_only=False)
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    x = torch.randn(5, 3, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], fast(x)[0])


def test_autotune_keeps_int8_on_the_native_kernel():
    x = torch.randn(1, 1, 8)
    fast = optimize(nn.LSTM(8, 16).eval(), dtype=torch.int8, autotune=[(x,)])
    assert fast.kernel == "native" and fast.native_weights == "int8"


def test_an_int8_lstm_refuses_to_be_exported_rather_than_compute_fp32():
    fast = optimize(nn.LSTM(4, 8).eval(), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8 PackedLSTM on the native kernel cannot be exported"):
        torch.export.export(fast, (torch.randn(2, 1, 4),))


def test_int8_packs_refuse_what_they_cannot_serve():
    gru_like = [torch.randn(8, 3), torch.randn(8, 2), torch.randn(8), torch.randn(8), torch.randn(2, 2)]
    with pytest.raises(RuntimeError, match="without a projection"):
        torch.ops.lstmopt.pack(gru_like, 2, True, 2, "int8")
    with pytest.raises(RuntimeError, match='"float32", "bfloat16" or'):
        torch.ops.lstmopt.pack(gru_like[:4], 2, True, 0, "int4")
    with pytest.raises(ValueError, match="native_weights must be"):
        optimize(nn.LSTM(3, 2)).use_kernel("native", native_weights="int4")


@pytest.mark.parametrize("weights", kernel_table.WEIGHTS_FORMATS, ids=lambda w: w.name)
def test_the_weights_formats_table_says_what_the_pack_op_takes(weights):
    # The table is where plan, use_kernel and the reasons read these facts; the C++ op must agree with it.
    plain = [w.detach() for w in nn.LSTM(3, 2)._flat_weights]
    projected = [w.detach() for w in nn.LSTM(3, 2, proj_size=1)._flat_weights]
    torch.ops.lstmopt.pack(plain, 2, True, 0, weights.name)
    lstm = optimize(nn.LSTM(3, 2, proj_size=1), exact=False)
    if weights.projection:
        torch.ops.lstmopt.pack(projected, 2, True, 1, weights.name)
        lstm.use_kernel("native", native_weights=weights.name)
        assert lstm.native_weights == weights.name
    else:
        with pytest.raises(RuntimeError, match="without a projection"):
            torch.ops.lstmopt.pack(projected, 2, True, 1, weights.name)
        with pytest.raises(ValueError, match=re.escape(weights.projection_obstacle())):
            lstm.use_kernel("native", native_weights=weights.name)
        decision = plan(nn.LSTM(3, 2, proj_size=1), dtype=getattr(torch, weights.name))[0]
        assert not decision.packed and weights.projection_obstacle() in decision.reason


SLOW = Ratio(0.99, 0.90, 1.10)  # no faster than bf16 beyond the noise


@pytest.mark.parametrize("native_fp32, default_fp32, kept, weights, kernels, exact", [
    (Ratio(0.50, 0.45, 0.55), SLOW, "float32", "float32", ("native", "native"), False),
    (Ratio(0.60, 0.55, 0.65), Ratio(0.40, 0.35, 0.45), "float32 on default kernels", "float32", ("onednn", "stock"),
     True),
    (SLOW, SLOW, "bfloat16", "bfloat16", ("native", "native"), False),
], ids=["fp32 native", "fp32 default kernels", "bf16 as asked"])
def test_autotune_keeps_bf16_weights_only_where_no_fp32_kernel_is_faster(monkeypatch, no_native_bf16, native_fp32,
                                                                        default_fp32, kept, weights, kernels, exact):
    def measured(fns, baseline, **kwargs):
        assert baseline == "bfloat16" and set(fns) == set(autotuning.WEIGHTS_CANDIDATES)
        return Comparison({name: 1e-3 for name in fns},
                          {"float32": native_fp32, "float32 on default kernels": default_fp32}, 9, True)

    monkeypatch.setattr(autotuning, "compare", measured)
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(6, 16)).eval()
    fast = optimize(model, dtype=torch.bfloat16)
    x = torch.randn(16, 1, 6)
    (choice,) = autotune(fast, [(x,)])
    assert (choice.inputs, choice.kernel, fast[0].native_weights) == ("weights", kept, weights)
    assert (fast[0].kernel, fast[0].sequence_kernel) == kernels
    (decision,) = with_kernels(plan(model, dtype=torch.bfloat16), fast, dtype=torch.bfloat16)
    assert (decision.packed_dtype, decision.kernel, decision.sequence_kernel, decision.exact) == (
        weights, *kernels, exact)
    faster = f"float32 weights on {'the onednn kernel' if exact else 'lstmopt' + chr(39) + 's native kernel'}"
    assert (faster + " measured faster than the bfloat16 asked for" in decision.reason) == (weights == "float32")
    assert ("bit-identical to eager" in decision.reason) == exact
    assert fast[0].computes_in_low_precision() == (weights == "bfloat16")
    with torch.no_grad():
        error = max_error(fast[0](x), model[0](x))
    assert error == 0 if exact else error < (TO_FP32 if weights == "bfloat16" else 1e-5)


def test_autotune_does_not_offer_the_default_kernels_to_a_bf16_lstm_with_a_projection(monkeypatch, no_native_bf16):
    def measured(fns, baseline, **kwargs):
        assert set(fns) == {"bfloat16", "float32"}  # oneDNN's packed op has no projection
        return Comparison({name: 1e-3 for name in fns}, {"float32": SLOW}, 9, True)

    monkeypatch.setattr(autotuning, "compare", measured)
    fast = optimize(nn.Sequential(nn.LSTM(6, 16, proj_size=4)).eval(), dtype=torch.bfloat16)
    (choice,) = autotune(fast, [(torch.randn(5, 1, 6),)])
    assert choice.kernel == "bfloat16" and fast[0].native_weights == "bfloat16"


def test_measure_reports_each_lstms_error_on_the_calls_the_examples_make():
    torch.manual_seed(4)
    model = nn.Sequential(nn.LSTM(6, 16)).eval()
    fast = optimize(model, dtype=torch.int8)
    samples = [(torch.randn(7, 2, 6),)]
    measured = measure(model, fast, samples)
    with torch.no_grad():
        expected = max_error(fast[0](samples[0][0]), model[0](samples[0][0]))
    assert measured.lstms["0"] == {"max_abs_error": expected, "inputs": "example inputs"}
    assert 0 < measured.model_max_abs_error < TO_FP32
    assert measured.tolerance == (TOLERANCE_FACTOR * measured.largest, 0.0)
    assert measure(model, fast, []).lstms["0"]["inputs"] == "synthetic inputs"


def test_the_cli_reports_int8_errors_and_verifies_with_the_tolerance_derived_from_them(tmp_path):
    torch.manual_seed(5)
    torch.save(nn.Sequential(nn.LSTM(12, 32, num_layers=2)), tmp_path / "model.pt")
    torch.save([(torch.randn(9, 2, 12),)], tmp_path / "examples.pt")
    result = invoke("optimize", str(tmp_path / "model.pt"), "-o", str(tmp_path / "int8.ts"), "--dtype", "int8",
                     "--trust", "--example-inputs", str(tmp_path / "examples.pt"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, schema())
    (module,) = report["modules"]
    assert module["packed_dtype"] == "int8" and module["error_inputs"] == "example inputs"
    assert 0 < module["error_vs_fp32"] < TO_FP32
    low = report["low_precision"]
    assert report["verification"]["ok"] and report["verification"]["atol"] == low["atol"] > 0
    assert report["verification"]["max_abs_error"] <= low["atol"]
    verified = invoke("verify", str(tmp_path / "model.pt"), str(tmp_path / "int8.ts"), "--trust", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["atol"] == low["atol"]


def test_int8_programs_are_refused_before_anything_runs(tmp_path):
    torch.save(nn.LSTM(3, 4), tmp_path / "model.pt")
    result = invoke("optimize", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.pt2"), "--dtype", "int8",
                     "--format", "pt2", "--trust")
    assert result.exit_code == 2
    assert "--dtype int8 writes torchscript or pickle artifacts, not pt2" in result.stderr
    assert not (tmp_path / "out.pt2").exists()


@settings(max_examples=40, deadline=None)
@given(configs(), st.sampled_from([0, 5]))
def test_bf16_on_the_native_kernel_computes_the_lstm_on_its_rounded_weights(case, proj_size):
    config, batch, steps, with_state, seed = case
    if proj_size >= config["hidden_size"]:
        proj_size = 0
    torch.manual_seed(seed)
    lstm = nn.LSTM(**config, proj_size=proj_size).eval()
    fast = PackedLSTM.from_lstm(lstm)
    fast.use_kernel("native", sequence_kernel="native", native_weights="bfloat16")
    shape = (batch, steps, config["input_size"]) if config["batch_first"] else (steps, batch, config["input_size"])
    x = torch.randn(shape)
    with torch.no_grad():
        result = fast(x)
        assert max_error(result, rounded(lstm, "bfloat16")(x)) < BF16_TO_ROUNDED
        assert max_error(result, lstm(x)) < TO_FP32


def test_bf16_without_native_bf16_runs_the_native_kernel_on_bf16_weights(no_native_bf16):
    model = nn.ModuleDict({"plain": nn.LSTM(6, 24), "projected": nn.LSTM(6, 24, proj_size=8)})
    fast = optimize(model, dtype=torch.bfloat16)
    for name in ("plain", "projected"):
        lstm = fast[name]
        assert isinstance(lstm, PackedLSTM) and lstm.native_weights == "bfloat16" and lstm.kernel == "native"
        assert lstm.native_packs.weights[0].dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in lstm.parameters())
    decisions = {d.name: d for d in plan(fast)}
    assert decisions["plain"].packed_dtype == "bfloat16" and not decisions["plain"].exact
    assert "bf16 weights on lstmopt's native kernel" in plan(model, dtype=torch.bfloat16)[0].reason


def test_bf16_is_refused_where_neither_oneDNN_nor_the_native_kernel_serves_it(no_native_bf16, monkeypatch):
    from lstmopt.errors import UnsupportedError

    monkeypatch.setattr("lstmopt.rewrite.swap.native.load", lambda: False)
    with pytest.raises(UnsupportedError, match="no native bf16 support in oneDNN"):
        optimize(nn.LSTM(3, 4), dtype=torch.bfloat16)


def test_bf16_artifacts_pack_bf16_again_when_loaded(no_native_bf16):
    torch.manual_seed(6)
    fast = optimize(nn.Sequential(nn.LSTM(10, 32, num_layers=2)).eval(), dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(fast), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(5, 3, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], fast(x)[0])


def test_a_job_with_nothing_in_low_precision_keeps_the_usual_tolerance(tmp_path):
    # --dtype int8 --approx on a GRU: the GRU runs the native fp32 kernel, nothing is int8
    torch.manual_seed(7)
    torch.save(nn.Sequential(nn.GRU(5, 16)), tmp_path / "model.pt")
    result = invoke("optimize", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.ts"), "--dtype", "int8",
                    "--approx", "--trust", "--input-shape", "2,6,5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    verification = report["verification"]
    assert report["low_precision"] is None and verification["ok"]
    assert (verification["atol"], verification["rtol"]) == BF16_TOLERANCE  # the dtype's default, not a derived one


class _AllKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.gru = nn.LSTM(6, 16), nn.GRU(6, 16)
        self.lstm_cell, self.gru_cell = nn.LSTMCell(6, 16), nn.GRUCell(6, 16)

    def forward(self, x):
        return self.lstm(x)[0] + self.gru(x)[0] + self.lstm_cell(x[0])[0] + self.gru_cell(x[0])


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("autotuned", [False, True])
def test_a_kind_without_low_precision_weights_says_it_runs_float32(dtype, autotuned):
    # GRUs and cells have no int8 or bf16 weights yet: asked for them, they run float32, and the reason says so
    from lstmopt.rewrite.swap import with_kernels

    torch.manual_seed(0)
    model = _AllKinds().eval()
    decisions = plan(model, dtype=dtype, exact=False)
    if autotuned:
        fast = optimize(model, dtype=dtype, exact=False, autotune=[(torch.randn(3, 2, 6),)])
        decisions = with_kernels(decisions, fast, dtype=dtype)
    asked = str(dtype).removeprefix("torch.")
    by_name = {d.name: d for d in decisions}
    for name in ("gru", "lstm_cell", "gru_cell"):
        assert by_name[name].packed and by_name[name].packed_dtype == "float32", name
        assert by_name[name].reason.startswith(f"float32, not {asked} ({asked} weights serve nn.LSTM only)"), name
    assert not by_name["lstm"].reason.startswith("float32")
    assert plan(model, exact=False)[1].reason.startswith("lstmopt's native kernel")  # fp32 asked: no note
