"""Every route to an optimized model's weights gives their true values: the Python module, the TorchScript
artifact (also frozen and optimized for inference) and the pickle artifact; and weights that change are
seen by the next call, also under torch.inference_mode() and on models created in it."""

import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from conftest import assert_same_result, lstm_pair, needs_native, run_python_json
from lstmopt import PackedLSTM, optimize
from lstmopt.artifacts.writing import write_artifact
from models import build_speech_encoder


class Model(nn.Module):
    """A BiLSTM between two other layers, so parent-level routes reach the LSTM's parameters."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(10, 12)
        self.lstm = nn.LSTM(12, 20, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def models(seed=0):
    torch.manual_seed(seed)
    model = Model().eval()
    return model, optimize(model)


X = torch.randn(3, 7, 10)


def run(model, x=X):
    with torch.no_grad():
        return model(x)


def assert_same_values(expected, actual):
    expected, actual = list(expected), list(actual)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and torch.equal(e, a)


# --- the Python module -------------------------------------------------------------------------------

def test_parameters_and_named_parameters_are_the_true_weights():
    model, opt = models()
    assert_same_values(model.parameters(), opt.parameters())
    assert [n for n, _ in opt.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert_same_values((p for _, p in model.named_parameters()), (p for _, p in opt.named_parameters()))
    assert_same_values(model.lstm.parameters(), opt.lstm.parameters())


def test_state_dict_with_keep_vars_and_the_parameter_dict_hold_the_true_weights():
    model, opt = models()
    expected = model.state_dict(keep_vars=True)
    actual = opt.state_dict(keep_vars=True)
    assert list(actual) == list(expected)
    assert_same_values(expected.values(), actual.values())
    assert all(isinstance(p, nn.Parameter) for p in actual.values())
    assert_same_values(model.lstm._parameters.values(), opt.lstm._parameters.values())


def test_parameters_to_vector_matches_the_original():
    model, opt = models()
    assert torch.equal(parameters_to_vector(opt.parameters()), parameters_to_vector(model.parameters()))
    assert parameters_to_vector(opt.parameters()).isfinite().all()


def test_copying_weights_out_pairwise_gives_a_working_model():
    # How EMA, weight averaging and model soups copy weights.
    model, opt = models()
    fresh = Model().eval()
    with torch.no_grad():
        for a, b in zip(fresh.parameters(), opt.parameters()):
            a.copy_(b)
    assert torch.equal(run(fresh), run(model))


def test_writing_weights_in_pairwise_is_seen_by_the_next_call():
    _, opt = models()
    other, _ = models(seed=1)
    run(opt)  # the packs exist and were used
    with torch.no_grad():
        for a, b in zip(opt.parameters(), other.parameters()):
            a.copy_(b)
    assert torch.equal(run(opt), run(other))


def test_an_ema_update_is_seen_by_the_next_call():
    model, opt = models()
    target, _ = models(seed=1)
    with torch.no_grad():
        for p_ema, p, p_ref in zip(opt.parameters(), target.parameters(), model.parameters()):
            p_ema.mul_(0.9).add_(p, alpha=0.1)
            p_ref.mul_(0.9).add_(p, alpha=0.1)
    assert torch.equal(run(opt), run(model))


@pytest.mark.parametrize("kernel", ["onednn", pytest.param("native", marks=needs_native)])
def test_load_state_dict_concurrent_with_forwards_gives_one_model_or_the_other(kernel):
    # Hot-reloading weights while serving: every call sees the old weights or the new ones, whole.
    _, first = lstm_pair(input_size=40, hidden_size=64, num_layers=2, bidirectional=True)
    _, second = lstm_pair(input_size=40, hidden_size=64, num_layers=2, bidirectional=True, seed=1)
    first.use_kernel(kernel)
    second.use_kernel(kernel)
    weights = [first.state_dict(), second.state_dict()]
    serving = PackedLSTM.from_lstm(first)
    x = torch.randn(9, 4, 40)
    with torch.no_grad():
        expected = [first(x)[0], second(x)[0]]
    errors, mixed, done = [], [], threading.Event()

    def serve():
        try:
            while not done.is_set():
                with torch.no_grad():
                    out = serving(x)[0]
                if not any(torch.equal(out, e) for e in expected):
                    mixed.append(out)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    servers = [threading.Thread(target=serve) for _ in range(2)]
    for t in servers:
        t.start()
    try:
        for i in range(200):
            serving.load_state_dict(weights[i % 2])
    finally:
        done.set()
        for t in servers:
            t.join()
    assert not errors and not mixed
    with torch.no_grad():
        assert torch.equal(serving(x)[0], expected[1])


# --- the artifacts -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The speech encoder's TorchScript and pickle artifacts, its weights and its outputs."""
    tmp = tmp_path_factory.mktemp("artifacts")
    model = build_speech_encoder().eval()
    x = torch.randn(3, 20, 40)
    for fmt in ("torchscript", "pickle"):
        write_artifact(optimize(model), tmp / f"{fmt}.pt", format=fmt, metadata={})
    with torch.no_grad():
        scripted_reference = torch.jit.optimize_for_inference(torch.jit.script(model))(x)
        torch.save({"x": x, "y": model(x), "y_ofi": scripted_reference, "state": model.state_dict(),
                    "names": [n for n, _ in model.named_parameters()]}, tmp / "expected.pt")
    return tmp


def test_torchscript_artifact_gives_true_weights_by_every_route(artifacts):
    result = run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None  # as where it is deployed
        import torch
        m = torch.jit.load({str(artifacts / 'torchscript.pt')!r})
        e = torch.load({str(artifacts / 'expected.pt')!r})
        state = m.state_dict()
        print(json.dumps({{
            "state_dict": list(state) == list(e["state"]) and all(torch.equal(state[k], v) for k, v in e["state"].items()),
            "parameters": all(torch.equal(p, v) for p, v in zip(m.parameters(), e["state"].values())),
            "named_parameters": [n for n, _ in m.named_parameters()] == e["names"],
            "attribute": torch.equal(m.encoder.weight_hh_l2_reverse, e["state"]["encoder.weight_hh_l2_reverse"]),
        }}))
    """)
    assert result == {"state_dict": True, "parameters": True, "named_parameters": True, "attribute": True}


def test_frozen_torchscript_artifact_saves_loads_and_repacks(artifacts):
    result = run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None
        import torch
        e = torch.load({str(artifacts / 'expected.pt')!r})
        frozen = torch.jit.freeze(torch.jit.load({str(artifacts / 'torchscript.pt')!r}))
        with torch.no_grad():
            in_process = torch.equal(frozen(e["x"]), e["y"])
        frozen.save({str(artifacts / 'frozen.pt')!r})
        reloaded = torch.jit.load({str(artifacts / 'frozen.pt')!r})
        fast = torch.jit.optimize_for_inference(torch.jit.load({str(artifacts / 'torchscript.pt')!r}))
        fast.save({str(artifacts / 'fast.pt')!r})
        with torch.no_grad():
            print(json.dumps({{"in_process": in_process, "reloaded": torch.equal(reloaded(e["x"]), e["y"]),
                               "optimize_for_inference": torch.equal(torch.jit.load({str(artifacts / 'fast.pt')!r})(e["x"]),
                                                                     e["y_ofi"]),
                               "packed": "mkldnn_rnn_layer" in str(reloaded.graph)}}))
    """)
    assert result == {"in_process": True, "reloaded": True, "optimize_for_inference": True, "packed": True}


def test_loading_weights_into_a_torchscript_artifact_is_seen_and_repack_restores_the_fast_path(artifacts):
    torch.manual_seed(1)
    other = build_speech_encoder().eval()
    for p in other.parameters():
        p.data.normal_()
    m = torch.jit.load(str(artifacts / "torchscript.pt"))
    x = torch.load(artifacts / "expected.pt")["x"]
    m.load_state_dict(other.state_dict())
    expected = run(other, x)
    assert torch.equal(run(m, x), expected)  # the stale packs are not used: nn.LSTM's path
    m.encoder.repack()
    assert torch.equal(run(m, x), expected)
    assert all(layer.is_packed() for layer in m.encoder.packed_layers.children())


def test_pickle_artifact_gives_true_weights(artifacts):
    e = torch.load(artifacts / "expected.pt")
    m = torch.load(artifacts / "pickle.pt", weights_only=False)
    assert_same_values(e["state"].values(), m.parameters())
    assert_same_values(e["state"].values(), m.state_dict().values())
    assert torch.equal(run(m, e["x"]), e["y"])


# --- inference mode ----------------------------------------------------------------------------------

def test_optimize_inside_inference_mode_gives_normal_tensors_and_the_fast_path():
    model, _ = models()
    with torch.inference_mode():
        opt = optimize(model, autotune=[(X,)])
        assert torch.equal(opt(X), model(X))
        assert all(layer.is_packed() for layer in opt.lstm.packed_layers)
    assert not any(p.is_inference() for p in opt.parameters())
    opt(X).sum().backward()  # usable with autograd afterwards, as the original is


def test_a_model_created_in_inference_mode_can_be_optimized_converted_loaded_and_moved():
    with torch.inference_mode():
        torch.manual_seed(0)
        model = Model().eval()
        expected = model(X)
        for opt in (optimize(model), optimize(model, autotune=[(X,)])):
            assert torch.equal(opt(X), expected)
        packed = PackedLSTM.from_lstm(model.lstm)
        packed.load_state_dict(model.lstm.state_dict())
        packed.to(torch.float64)
        packed.float()
        x = torch.randn(7, 3, 12)
        assert_same_result(model.lstm(x), packed(x))


def test_edits_inside_inference_mode_are_seen_where_tensors_track_versions():
    model, opt = models()
    with torch.inference_mode():
        run(opt)
        opt.lstm.weight_hh_l1.mul_(1.5)  # a normal tensor: its version moves, even in inference mode
        model.lstm.weight_hh_l1.mul_(1.5)
        assert torch.equal(opt(X), model(X))


def test_edits_of_inference_tensors_take_effect_after_repack():
    # Inference tensors have no version counter: an in-place edit cannot be seen, only declared.
    with torch.inference_mode():
        torch.manual_seed(0)
        model = Model().eval()
        opt = optimize(model, inplace=True)
        assert opt.lstm.weight_hh_l0.is_inference()
        reference = Model().eval()
        reference.load_state_dict(model.state_dict())
        reference.lstm.weight_hh_l0.mul_(2)
        opt.lstm.weight_hh_l0.mul_(2)
        opt.lstm.repack()
        assert torch.equal(opt(X), reference(X))

