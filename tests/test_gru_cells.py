"""nn.GRUCell: swapped for a PackedGRUCell, bit-identical on ATen's cell op by default and on the native
kernel (held to the approximate-kernel contract) where approximate kernels are allowed, with nn.GRUCell's
interface, keys, errors and fallbacks."""

import copy
import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import assert_calls_see_whole_weights, counting_kernels, invoke, needs_native
from lstmopt import PackedGRUCell, optimize, plan
from lstmopt.kernels.accuracy import accuracy
from lstmopt.rewrite.autotune import autotune
from models import GRUCellStreamer, build_gru_cell_streamer, trained_like

pytestmark = needs_native


@settings(max_examples=40, deadline=None)
# Hidden sizes from 16, as for nn.GRU (test_gru.py says why: below, one rounding is many ulps for eager too).
@given(input_size=st.sampled_from([1, 8, 80, 336]), hidden_size=st.sampled_from([16, 20, 64, 256]),
       bias=st.booleans(), batch=st.sampled_from([None, 1, 3, 7]), with_state=st.booleans(),
       scale=st.sampled_from([1.0, 3.0]), saturation=st.sampled_from([0.0, 4.0]), seed=st.integers(0, 999))
def test_the_native_gru_cell_keeps_the_contract(input_size, hidden_size, bias, batch, with_state, scale,
                                                saturation, seed):
    torch.manual_seed(seed)
    cell = trained_like(nn.GRUCell(input_size, hidden_size, bias=bias), scale, saturation, seed)
    packed = PackedGRUCell.from_cell(cell, kernel="native").eval()
    reference = copy.deepcopy(cell).double()
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = 2 * torch.randn(*lead, input_size, generator=g)
    h = torch.randn(*lead, hidden_size, generator=g) if with_state else None
    with torch.no_grad(), counting_kernels() as calls:
        expected, actual = cell(x, h), packed(x, h)
        truth = reference(x.double(), None if h is None else h.double())
    assert calls["stock cell"] == 0 and calls["aten cell"] == 0  # the native kernel took the step itself
    assert actual.shape == expected.shape
    measured = accuracy(expected, actual, truth)
    assert measured.ok, measured


def test_gru_cells_run_aten_s_cell_op_bit_identically_by_default_and_the_native_kernel_with_approx():
    streamer = GRUCellStreamer().eval()
    exact = optimize(streamer)
    assert isinstance(exact.encoder_cell, PackedGRUCell) and exact.encoder_cell.kernel == "aten"
    decision = {d.name: d for d in plan(streamer)}["encoder_cell"]
    assert decision.kind == "GRUCell" and decision.packed and decision.exact and decision.kernel == "aten"
    assert decision.reason == "ATen's cell op called directly, bit-identical to nn.GRUCell"
    x = torch.randn(2, 6, 8)
    with torch.no_grad(), counting_kernels() as calls:
        assert torch.equal(exact(x), streamer(x))
    assert calls["aten cell"] == 12 and calls["stock cell"] == 0  # 6 steps of two cells
    fast = optimize(streamer, exact=False)
    assert fast.encoder_cell.kernel == "native" and fast.context_cell.uses_native_kernel
    decision = {d.name: d for d in plan(streamer, exact=False)}["context_cell"]
    assert decision.packed and decision.kernel == "native" and not decision.exact
    with torch.no_grad(), counting_kernels() as calls:
        torch.testing.assert_close(fast(x), streamer(x), atol=1e-5, rtol=0)
    assert calls["aten cell"] == 0 and calls["stock cell"] == 0


def test_the_aten_kernel_serves_any_dtype_and_leaves_unbatched_steps_to_nn_grucell():
    cell = nn.GRUCell(5, 8).double().eval()
    packed = PackedGRUCell.from_cell(cell)
    assert packed.kernel == "aten" and not packed.uses_native_kernel
    x, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad(), counting_kernels() as calls:
        for args in ((x,), (x, h), (x[0],), (x[0], h[0])):
            assert torch.equal(packed(*args), cell(*args))
    assert calls["aten cell"] == 2 and calls["stock cell"] == 2
    assert plan(nn.GRUCell(5, 8).double(), exact=False)[0].reason.endswith(
        "(not the native kernel: the native kernel computes in float32 only)")


def test_shared_subclassed_and_hooked_gru_cells():
    shared = nn.GRUCell(4, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.ModuleList([shared])})
    fast = optimize(model, exact=False)
    assert isinstance(fast["a"][0], PackedGRUCell) and fast["a"][0] is fast["b"][0]
    (decision,) = plan(model, exact=False)
    assert decision.aliases == ("b.0",)
    assert isinstance(optimize(nn.GRUCell(4, 8), exact=False), PackedGRUCell)

    class Gated(nn.GRUCell):
        def forward(self, input, hx=None):
            return super().forward(input, hx) * 0.5

    (decision,) = plan(Gated(4, 8), exact=False)
    assert not decision.packed and decision.reason.endswith("subclasses nn.GRUCell; its own code would be bypassed")
    (decision,) = plan(nn.utils.parametrizations.weight_norm(nn.GRUCell(4, 8), "weight_hh"), exact=False)
    assert not decision.packed and "weight_hh is not a parameter" in decision.reason
    with pytest.raises(ValueError, match="cannot pack this GRUCell: LSTMCell is not an nn.GRUCell"):
        PackedGRUCell.from_cell(nn.LSTMCell(4, 8))


@pytest.mark.parametrize("kernel", ["aten", "native"])
def test_keys_parameters_and_the_stock_path_are_nn_grucell_s(kernel):
    cell = nn.GRUCell(5, 8).eval()
    packed = PackedGRUCell.from_cell(cell, kernel)
    assert list(packed.state_dict()) == list(cell.state_dict())
    assert [n for n, _ in packed.named_parameters()] == [n for n, _ in cell.named_parameters()]
    x = torch.randn(2, 5)
    with counting_kernels() as calls:
        assert torch.equal(packed(x), cell(x))  # autograd on: nn.GRUCell's own path, bit for bit
        with torch.no_grad():
            assert torch.equal(packed.train()(x), cell(x))
    assert calls["stock cell"] == 2
    with torch.no_grad():
        packed.eval()
        with pytest.raises(RuntimeError, match="same dtype"):  # float64 input: nn.GRUCell's own error
            packed(x.double())


@pytest.mark.parametrize("kernel", ["aten", "native"])
@pytest.mark.parametrize("call, error", [
    (lambda cell: cell(torch.randn(2, 3, 5)), "Expected input to be 1D or 2D"),
    (lambda cell: cell(torch.randn(2, 4)), "input has inconsistent input_size"),
    (lambda cell: cell(torch.randn(2, 5), torch.randn(3, 8)), "Input batch size 2 doesn't match"),
    (lambda cell: cell(torch.randn(2, 5), torch.randn(2, 8, 1)), "Expected hidden to be 1D or 2D"),
    (lambda cell: cell(torch.randn(2, 5), torch.randn(2, 7)), "hidden0 has inconsistent hidden_size"),
    (lambda cell: cell(torch.randn(5), (torch.randn(8),)), "'tuple' object has no attribute 'dim'"),
])
def test_bad_input_raises_what_nn_grucell_raises(kernel, call, error):
    cell = nn.GRUCell(5, 8).eval()
    packed = PackedGRUCell.from_cell(cell, kernel)
    with torch.no_grad():
        with pytest.raises(Exception) as stock:
            call(cell)
        with pytest.raises(type(stock.value)) as ours:
            call(packed)
    assert str(ours.value) == str(stock.value) and error in str(ours.value)


def test_empty_batches_and_noncontiguous_inputs_do_not_reach_the_kernel_unchecked():
    cell = nn.GRUCell(6, 16).eval()
    packed = PackedGRUCell.from_cell(cell, "native")
    with torch.no_grad():
        assert packed(torch.randn(0, 6)).shape == (0, 16)
        x = torch.randn(6, 3).t()  # (3, 6), not contiguous
        h = torch.randn(16, 3).t()
        torch.testing.assert_close(packed(x, h), cell(x, h), atol=1e-6, rtol=0)
        strided = torch.randn(3, 12)[:, ::2]
        torch.testing.assert_close(packed(strided, h[:, :]), cell(strided, h), atol=1e-6, rtol=0)


def test_weights_changed_any_way_are_repacked():
    cell = nn.GRUCell(5, 8).eval()
    packed = PackedGRUCell.from_cell(cell, "native")
    x = torch.randn(2, 5)
    other = nn.GRUCell(5, 8)
    with torch.no_grad():
        packed.load_state_dict(other.state_dict())
        torch.testing.assert_close(packed(x), other.eval()(x), atol=1e-6, rtol=0)
        packed.weight_hh.mul_(0.5)
        other.weight_hh.mul_(0.5)
        torch.testing.assert_close(packed(x, x.new_ones(2, 8)), other(x, x.new_ones(2, 8)), atol=1e-6, rtol=0)
        packed.bias_ih = nn.Parameter(torch.zeros(24))
        other.bias_ih = nn.Parameter(torch.zeros(24))
        torch.testing.assert_close(packed(x), other(x), atol=1e-6, rtol=0)
        assert packed.to(torch.float64)(x.double()).dtype == torch.float64  # stock path in float64
        assert not packed.uses_native_kernel


@pytest.mark.parametrize("kernel", ["aten", "native"])
def test_pickles_copies_and_torchscript_pack_again_where_loaded(kernel):
    cell = nn.GRUCell(5, 8).eval()
    packed = PackedGRUCell.from_cell(cell, kernel)
    x, h = torch.randn(3, 5), torch.randn(3, 8)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(packed), scripted)
    scripted.seek(0)
    with torch.no_grad():
        expected = [packed(x), packed(x, h), packed(x[0], h[0])]
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(packed), torch.jit.load(scripted)):
            assert all(map(torch.equal, [other(x), other(x, h), other(x[0], h[0])], expected))
        loaded = torch.jit.load(io.BytesIO(scripted.getvalue()))
        loaded.load_state_dict(nn.GRUCell(5, 8).state_dict())  # a scripted cell notices, and computes stock
        assert not torch.equal(loaded(x), expected[0])


def test_concurrent_calls_and_loads_see_whole_weights():
    cells = [nn.GRUCell(16, 32).eval() for _ in range(2)]
    assert_calls_see_whole_weights(PackedGRUCell.from_cell(cells[0], "native"), cells, torch.randn(2, 16),
                                   lambda out: out)


def test_autotune_times_every_gru_cell_kernel():
    fast = optimize(GRUCellStreamer(), exact=False)
    (encoder, context) = autotune(fast, [(torch.randn(1, 12, 8),)], exact=False, rounds=3)
    assert encoder.inputs == "cell" and set(encoder.ms_per_forward) == {"aten", "native", "stock"}
    assert fast.encoder_cell.kernel == encoder.kernel
    exact = autotune(optimize(GRUCellStreamer()), [(torch.randn(1, 12, 8),)], exact=True, rounds=3)
    assert all(set(choice.ms_per_forward) == {"aten", "stock"} for choice in exact)


@pytest.mark.parametrize("approx", [False, True])
def test_the_cli_writes_a_verified_gru_cell_artifact(tmp_path, monkeypatch, approx):
    monkeypatch.chdir(tmp_path)
    torch.save(build_gru_cell_streamer().state_dict(), "w.pt")
    result = invoke("optimize", "w.pt", "-o", "out.pt", "--factory", "models:build_gru_cell_streamer",
                    "--input-shape", "1,12,8", *(["--approx"] if approx else []), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    cells = {d["name"]: d for d in report["modules"]}
    assert cells["encoder_cell"]["kind"] == "GRUCell" and cells["encoder_cell"]["packed"]
    assert cells["encoder_cell"]["kernel"] == ("native" if approx else "aten")
    assert report["verification"]["ok"]
    assert report["verification"]["criterion"] == ("float64" if approx else "tolerance")
    assert any(c["name"].startswith("context_cell case") for c in report["verification"]["lstm_outputs"])
