"""The approximate-kernel contract (lstmopt.kernels.accuracy): on realistic weights, every approximate
kernel's error against a float64 reference is at most FACTOR times eager fp32's own."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from conftest import NATIVE
from lstmopt import PackedLSTM
from lstmopt.job.pipeline import OptimizeOptions, optimize_file
from lstmopt.kernels.accuracy import FACTOR, accuracy
from models import Encoder, trained_like

TENSOR_KERNELS = ["cell"] + (["native"] if NATIVE else [])
SEQUENCE_KERNELS = ["onednn"] + (["native"] if NATIVE else [])


@st.composite
def configurations(draw):
    return dict(
        config=dict(input_size=draw(st.sampled_from([8, 40, 80])), hidden_size=draw(st.sampled_from([16, 64, 128])),
                    num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()), bias=draw(st.booleans())),
        scale=draw(st.sampled_from([1.0, 3.0, 8.0])), saturation=draw(st.sampled_from([0.0, 4.0])),
        steps=draw(st.sampled_from([1, 5, 50, 200])), batch=draw(st.sampled_from([1, 4])),
        with_state=draw(st.booleans()), seed=draw(st.integers(0, 999)))


def _inputs(case):
    config, g = case["config"], torch.Generator().manual_seed(case["seed"])
    x = 2 * torch.randn(case["steps"], case["batch"], config["input_size"], generator=g)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    hx = None
    if case["with_state"]:
        hx = tuple(torch.randn(states, case["batch"], config["hidden_size"], generator=g) for _ in range(2))
    return x, hx


def _in_float64(hx):
    return None if hx is None else tuple(h.double() for h in hx)


def _eager_and_reference(case):
    torch.manual_seed(case["seed"])
    eager = trained_like(nn.LSTM(**case["config"]), case["scale"], case["saturation"], case["seed"])
    return eager, copy.deepcopy(eager).double()


def _assert_within_contract(kernel, expected, actual, truth):
    """Output, h_n and c_n (``expected`` eager's, ``truth`` float64's) within the contract."""
    for e, a, t in zip(expected, actual, truth):
        measured = accuracy(e, a, t)
        assert measured.ok, f"{kernel}: {measured}"


@settings(max_examples=40, deadline=None)
@given(configurations())
def test_tensor_kernels_keep_the_contract_on_realistic_weights(case):
    _check_tensor_kernels(case)


@settings(max_examples=25, deadline=None)
@given(configurations())
def test_sequence_kernels_keep_the_contract_on_realistic_weights(case):
    _check_sequence_kernels(case)


def _check_tensor_kernels(case):
    eager, reference = _eager_and_reference(case)
    x, hx = _inputs(case)
    with torch.no_grad():
        expected = eager(x, hx)
        truth = reference(x.double(), _in_float64(hx))
        for kernel in TENSOR_KERNELS:
            if kernel == "cell" and case["steps"] != 1:
                continue  # it serves single steps only
            packed = PackedLSTM.from_lstm(eager).eval()
            packed.use_kernel(kernel)
            actual = packed(x, hx)
            _assert_within_contract(kernel, (expected[0], *expected[1]), (actual[0], *actual[1]),
                                    (truth[0], *truth[1]))


def _check_sequence_kernels(case):
    eager, reference = _eager_and_reference(case)
    g = torch.Generator().manual_seed(case["seed"])
    lengths = sorted(torch.randint(1, case["steps"] + 1, (case["batch"],), generator=g).tolist(), reverse=True)
    rows = [2 * torch.randn(n, case["config"]["input_size"], generator=g) for n in lengths]
    sequence = pack_sequence(rows)
    with torch.no_grad():
        expected = eager(sequence)
        truth = reference(pack_sequence([r.double() for r in rows]))
        for kernel in SEQUENCE_KERNELS:
            packed = PackedLSTM.from_lstm(eager).eval()
            packed.use_kernel(sequence_kernel=kernel)
            actual = packed(sequence)
            _assert_within_contract(kernel, (expected[0].data, *expected[1]), (actual[0].data, *actual[1]),
                                    (truth[0].data, *truth[1]))


def _case(num_layers, steps, with_state, seed):
    return dict(config=dict(input_size=80, hidden_size=16, num_layers=num_layers, bidirectional=False, bias=False),
                scale=8.0, saturation=0.0, steps=steps, batch=1, with_state=with_state, seed=seed)


# Known breaches, found by random draws in CI: the native kernel at 1.15x and 2.5x the bound (on an h_n, a
# c_n). Both are outputs of 16 values (H=16, batch 1) from sums of 80-96 products of +-2 weights and inputs
# whose partial sums reach +-26 for a total near 0.08: any fp32 order of such a sum rounds at ulp(26), and
# the error of one order against another is luck. In the second case eager's order lands 8e-8 from float64,
# the kernel's (64 rows, then the rest) 3.8e-6 and plain fp32 summation in index order 1.2e-6: the bound,
# 8x the largest of eager's 16 errors, was calibrated on outputs of 64 and more values (accuracy.py). Kept as
# strict xfails so that a kernel or contract change that fixes them says so here.
@pytest.mark.skipif(not NATIVE, reason="the native kernel is unavailable")
@pytest.mark.xfail(strict=True, reason="eager's error over 16 values is one lucky draw (see above)")
@pytest.mark.parametrize("check, case", [
    (_check_tensor_kernels, _case(2, 50, True, 77)),
    (_check_sequence_kernels, _case(1, 1, False, 2)),
], ids=["tensor, h_n", "sequence, c_n"])
def test_known_breaches_on_outputs_of_16_values(check, case):
    check(case)


def test_the_bound_is_relative_to_eager_and_never_below_one_ulp():
    reference = torch.tensor([0.5, -0.25], dtype=torch.float64)
    exact = reference.float()
    assert accuracy(exact, exact, reference).bound == FACTOR * 2.0 ** -23  # eager exact: one ulp of 1
    large = torch.tensor([40.0, -3.0], dtype=torch.float64)
    assert accuracy(large.float(), large.float(), large).bound == FACTOR * 2.0 ** -23 * 40  # of the output's scale
    eager = exact + torch.tensor([1e-6, 0.0])
    within, beyond = exact + 7e-6, exact + 9e-6
    assert accuracy(eager, within, reference).ok and not accuracy(eager, beyond, reference).ok
    nan = torch.tensor([float("nan"), 0.0])
    assert not accuracy(exact, nan, reference).ok


@pytest.mark.parametrize("scale", [3.0])
def test_an_approx_artifact_on_trained_like_weights_verifies_by_the_contract(tmp_path, monkeypatch, scale):
    # Weights like a voice-activity detector's (|w| up to 3), where "within 1e-6" failed.
    monkeypatch.chdir(tmp_path)
    model = Encoder()
    trained_like(model.lstm, scale, 4.0, 0)
    torch.save(model.state_dict(), "model.pt")
    report = optimize_file(OptimizeOptions(input="model.pt", output="out.pt", factory="models:Encoder",
                                           input_shape=(1, 40, 16), autotune=True, approx=True))
    assert report.ok, report.error
    verification = report.verification
    if all(m["exact"] for m in report.modules):
        assert verification["criterion"] == "tolerance"  # autotune kept exact kernels: nothing to relax
        return
    assert verification["criterion"] == "float64" and verification["factor"] == FACTOR
    checks = verification["model_outputs"] + verification["lstm_outputs"]
    assert all(c["vs_float64"] <= c["bound"] for c in checks if c["vs_float64"] is not None)
    assert verification["max_abs_error"] > 1e-6  # the absolute "within 1e-6" would have failed this artifact
    assert any(c["vs_float64"] is not None for c in checks)
