"""The kernels a PackedLSTM can run, and autotune's choice among them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import APPROX_EXTRA, assert_same_result, lstm_pair, needs_native
from lstmopt import optimize, plan
from lstmopt.rewrite import autotune as autotuning
from lstmopt.rewrite.autotune import MARGIN, autotune
from lstmopt.rewrite.swap import with_kernels
from lstmopt.rewrite.timing import Comparison, Ratio
from models import Encoder, build_forecaster, build_tagger

CELL_TOLERANCE = dict(atol=1e-6, rtol=1e-6)


def chosen_by_the_rule(choice):
    """The kernel autotune must keep: the fastest of those faster than the default beyond the noise."""
    winners = {k: r for k, r in choice.ratios.items() if r.high < 1 - MARGIN}
    return min(winners, key=lambda k: winners[k].median) if winners else choice.baseline


@st.composite
def single_step_cases(draw):
    config = dict(input_size=draw(st.sampled_from([1, 8, 33, 64])), hidden_size=draw(st.sampled_from([1, 16, 31, 64])),
                  num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
                  batch_first=draw(st.booleans()))
    return config, draw(st.sampled_from([1, 3])), draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@settings(max_examples=60, deadline=None)
@given(single_step_cases())
def test_cell_kernel_is_within_1e6_of_nn_lstm_on_single_steps(case):
    config, batch, unbatched, with_state, seed = case
    ref, packed = lstm_pair(seed=seed, **config)
    packed.use_kernel("cell")
    g = torch.Generator().manual_seed(seed)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    if unbatched:
        x, shape = torch.randn(1, config["input_size"], generator=g), (states, config["hidden_size"])
    else:
        x = torch.randn((batch, 1, config["input_size"]) if config["batch_first"] else (1, batch, config["input_size"]),
                        generator=g)
        shape = (states, batch, config["hidden_size"])
    hx = (torch.randn(shape, generator=g), torch.randn(shape, generator=g)) if with_state else None
    with torch.no_grad():
        (out_e, (h_e, c_e)), (out_c, (h_c, c_c)) = ref(x, hx), packed(x, hx)
    for e, a in ((out_e, out_c), (h_e, h_c), (c_e, c_c)):
        assert e.shape == a.shape
        torch.testing.assert_close(a, e, **CELL_TOLERANCE)


def test_cell_kernel_leaves_longer_sequences_to_nn_lstm_exactly():
    ref, packed = lstm_pair(num_layers=2, bidirectional=True)
    packed.use_kernel("cell")
    x = torch.randn(5, 3, 12)
    with torch.no_grad():
        assert_same_result(ref(x), packed(x))


@pytest.mark.parametrize("kernel", ["onednn", "cell", pytest.param("native", marks=needs_native), "stock"])
def test_only_the_onednn_kernel_keeps_packs(kernel):
    _, packed = lstm_pair(input_size=64, hidden_size=64, num_layers=2)
    packed.use_kernel(kernel)
    assert packed.kernel == kernel
    packs = [layer.packs is not None for layer in packed.packed_layers]
    assert all(packs) if kernel == "onednn" else not any(packs)
    assert packed.uses_native_kernel == (kernel == "native")  # the native kernel's own layout, only while used


def test_kernels_survive_pickling_and_scripting_across_repeated_calls(tmp_path):
    torch.manual_seed(0)
    model = build_forecaster().eval()
    fast = optimize(model)
    fast.decoder.use_kernel("cell")
    fast.encoder.use_kernel("stock")
    restored = torch.load(_saved(fast, tmp_path), weights_only=False)
    assert (restored.decoder.kernel, restored.encoder.kernel) == ("cell", "stock")
    scripted = torch.jit.script(fast)
    x = torch.randn(2, 9, 3)
    with torch.no_grad():
        expected = model(x)
        for _ in range(4):  # the profiling executor re-optimizes the graph after the first calls
            torch.testing.assert_close(scripted(x), expected, **CELL_TOLERANCE)
            torch.testing.assert_close(restored(x), expected, **CELL_TOLERANCE)


def _saved(module, tmp_path):
    path = tmp_path / "m.pt"
    torch.save(module, path)
    return path


def test_unknown_kernels_are_rejected():
    _, packed = lstm_pair()
    with pytest.raises(ValueError, match="kernel must be one of"):
        packed.use_kernel("cudnn")


def test_autotune_measures_every_candidate_on_the_calls_each_lstm_receives():
    torch.manual_seed(0)
    model = build_forecaster().eval()
    fast = optimize(model)
    choices = {c.name: c for c in autotune(fast, [(torch.randn(4, 30, 3),)], rounds=3)}
    assert set(choices) == {"encoder", "decoder"}
    assert choices["encoder"].calls == 1 and choices["decoder"].calls == 6  # one step per horizon step
    for name, choice in choices.items():
        assert set(choice.ms_per_forward) == {"onednn", "stock"}  # exact kernels only by default
        assert choice.baseline == "onednn" and choice.kernel == chosen_by_the_rule(choice)
        assert fast.get_submodule(name).kernel == choice.kernel and choice.exact
    x = torch.randn(2, 11, 3)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_autotune_with_approx_also_times_the_cell_kernel_and_plan_reports_it():
    torch.manual_seed(0)
    model = build_forecaster().eval()
    fast = optimize(model, autotune=[(torch.randn(2, 30, 3),)], exact=False)
    decoder = fast.decoder
    assert set(decoder.autotune_ms) == {"onednn", "cell", "stock"} | APPROX_EXTRA
    decisions = {d.name: d for d in plan(fast)}
    assert decisions["decoder"].kernel == decoder.kernel
    assert decisions["decoder"].exact == (decoder.kernel in ("onednn", "stock"))
    assert decisions["decoder"].autotune_ms == decoder.autotune_ms


def test_autotune_never_times_a_kernel_that_would_not_serve_the_recorded_calls():
    torch.manual_seed(0)
    fast = optimize(build_forecaster().eval())
    choices = {c.name: c for c in autotune(fast, [(torch.randn(2, 30, 3),)], exact=False, rounds=3)}
    encoder = choices["encoder"]  # 30 steps per call: the single-step cell kernel would hand them to nn.LSTM
    assert encoder.not_serving == ("cell",) and "cell" not in encoder.ms_per_forward
    assert fast.encoder.kernel != "cell" and "cell" in choices["decoder"].ms_per_forward


@pytest.mark.parametrize("stock, chosen", [
    (Ratio(0.98, 0.95, 1.01), "onednn"),  # faster within the noise: not a reason to leave the default
    (Ratio(0.985, 0.98, 0.99), "onednn"),  # consistently faster, by less than the margin
    (Ratio(0.50, 0.45, 0.55), "stock"),  # faster beyond the noise
])
def test_autotune_leaves_the_default_only_for_a_kernel_faster_beyond_the_noise(monkeypatch, stock, chosen):
    def measured(fns, baseline, **kwargs):
        return Comparison({name: 1e-3 for name in fns}, {"stock": stock}, 9, True)

    monkeypatch.setattr(autotuning, "compare", measured)
    model = Encoder().eval()
    fast = optimize(model)
    (choice,) = autotune(fast, [(torch.randn(2, 5, 16),)])
    assert choice.kernel == chosen and fast.lstm.kernel == chosen
    (decision,) = with_kernels(plan(model), fast)  # what the report and the LSTMs table say
    if chosen == "onednn":
        assert choice.note == "kept onednn: no kernel was faster beyond the timing noise"
        assert decision.reason == "bit-identical to eager; autotune " + choice.note
    else:
        assert "nn.LSTM itself measured fastest on these inputs (0.50x onednn's time, 95% interval 0.45-0.55x)" \
            in decision.reason


def test_autotune_ignores_lstms_the_samples_do_not_reach():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.LSTM(4, 8), nn.LSTM(4, 8)

        def forward(self, x):
            return self.used(x)[0]

    fast = optimize(Two().eval())
    choices = autotune(fast, [(torch.randn(3, 2, 4),)], rounds=3)
    assert [c.name for c in choices] == ["used"] and fast.unused.autotune_ms is None


def test_scripted_encoder_with_state_matches_under_every_kernel():
    torch.manual_seed(0)
    model = Encoder().eval()
    for kernel in ("onednn", "stock"):
        fast = optimize(model)
        fast.lstm.use_kernel(kernel)
        scripted = torch.jit.script(fast)
        x = torch.randn(3, 6, 16)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(scripted(x)[0], model(x)[0])


@st.composite
def sequence_cases(draw):
    config = dict(input_size=draw(st.sampled_from([1, 8, 33])), hidden_size=draw(st.sampled_from([1, 16, 31, 64])),
                  num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
                  batch_first=draw(st.booleans()))
    batch = draw(st.integers(1, 6))
    lengths = draw(st.one_of(
        st.lists(st.integers(1, 12), min_size=batch, max_size=batch),  # anything, length 1 included
        st.integers(1, 12).map(lambda n: [n] * batch),  # all equal
    ))
    return config, lengths, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@pytest.mark.parametrize("kernel", ["onednn", pytest.param("native", marks=needs_native)])
@settings(max_examples=80, deadline=None)
@given(case=sequence_cases())
def test_sequence_kernels_are_within_1e6_of_nn_lstm_on_packed_sequences(kernel, case):
    config, lengths, with_state, presorted, seed = case
    ref, packed = lstm_pair(seed=seed, **config)
    packed.use_kernel(sequence_kernel=kernel)
    g = torch.Generator().manual_seed(seed)
    lengths = sorted(lengths, reverse=True) if presorted else lengths
    batch, steps = len(lengths), max(lengths)
    x = torch.randn((batch, steps, config["input_size"]) if config["batch_first"] else (steps, batch, config["input_size"]),
                    generator=g)
    seq = pack_padded_sequence(x, torch.tensor(lengths), batch_first=config["batch_first"], enforce_sorted=presorted)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    hx = tuple(torch.randn(states, batch, config["hidden_size"], generator=g) for _ in range(2)) if with_state else None
    with torch.no_grad():
        (out_e, (h_e, c_e)), (out_s, (h_s, c_s)) = ref(seq, hx), packed(seq, hx)
    assert torch.equal(out_s.batch_sizes, out_e.batch_sizes)
    for indices in ("sorted_indices", "unsorted_indices"):
        e, s = getattr(out_e, indices), getattr(out_s, indices)
        assert (e is None and s is None) or torch.equal(e, s)
    for e, a in ((out_e.data, out_s.data), (h_e, h_s), (c_e, c_s)):  # h_n, c_n in the caller's order
        assert e.shape == a.shape
        torch.testing.assert_close(a, e, **CELL_TOLERANCE)


def test_autotune_chooses_a_sequence_kernel_only_where_approximation_is_allowed():
    torch.manual_seed(0)
    model = build_tagger().eval()
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 50, (8, 30), generator=g), torch.randint(1, 31, (8,), generator=g))]
    exact = optimize(model, autotune=samples)
    assert exact.lstm.sequence_kernel == "stock" and set(exact.lstm.sequence_autotune_ms) == {"stock"}
    approx = optimize(model, autotune=samples, exact=False)
    assert set(approx.lstm.sequence_autotune_ms) == {"stock", "onednn"} | APPROX_EXTRA
    (decision,) = plan(approx)
    assert decision.sequence_kernel == approx.lstm.sequence_kernel
    assert decision.exact == (approx.lstm.sequence_kernel == "stock")
    approx.lstm.use_kernel(sequence_kernel="onednn")
    (decision,) = plan(approx)
    assert not decision.exact and decision.sequence_kernel == "onednn"
    with torch.no_grad():
        torch.testing.assert_close(approx(*samples[0]), model(*samples[0]), **CELL_TOLERANCE)


def test_unknown_sequence_kernels_are_rejected():
    _, packed = lstm_pair()
    with pytest.raises(ValueError, match="sequence_kernel must be one of"):
        packed.use_kernel(sequence_kernel="cell")
