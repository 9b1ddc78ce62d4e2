"""optimize() and plan(): which LSTMs of a model are swapped, how, and what is recorded."""

import pytest
import torch
from torch import nn

from conftest import needs_bf16
from lstmopt import Decision, PackedLSTM, optimize, plan


class Custom(nn.LSTM):
    pass


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.front = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.LSTM(8, 16)))
        self.stack = nn.ModuleList([nn.LSTM(16, 16, batch_first=True), nn.GRU(16, 16)])
        self.heads = nn.ModuleDict({"proj": nn.LSTM(16, 16, proj_size=8), "custom": Custom(16, 16)})


def test_nested_lstms_at_any_depth_are_swapped():
    model = optimize(Deep())
    assert isinstance(model.front[1][0], PackedLSTM)
    assert isinstance(model.stack[0], PackedLSTM)
    assert type(model.stack[1]) is nn.GRU
    assert type(model.heads["proj"]) is nn.LSTM
    assert isinstance(model.heads["custom"], Custom) and isinstance(model.heads["custom"], PackedLSTM)


def test_plan_records_every_lstm_with_its_config_and_reason():
    decisions = {d.name: d for d in plan(Deep())}
    assert set(decisions) == {"front.1.0", "stack.0", "stack.1", "heads.proj", "heads.custom"}
    assert decisions["stack.1"].kind == "GRU" and not decisions["stack.1"].packed
    assert decisions["stack.1"].reason.startswith("nn.GRU has no exact kernel")
    assert decisions["stack.0"].packed and decisions["stack.0"].batch_first and decisions["stack.0"].exact
    assert decisions["heads.proj"].reason.startswith("proj_size>0 has no exact kernel (oneDNN has no projection)")
    assert not decisions["heads.proj"].packed and decisions["heads.proj"].proj_size == 8
    assert decisions["heads.custom"].packed and decisions["heads.custom"].reason == "bit-identical to eager"
    assert decisions["front.1.0"].to_dict()["hidden_size"] == 16


def test_the_input_model_is_untouched_unless_inplace():
    model = Deep()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model)
    assert fast is not model and type(model.stack[0]) is nn.LSTM
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = optimize(model, inplace=True)
    assert same is model and isinstance(model.stack[0], PackedLSTM)


def test_a_model_that_is_an_lstm_is_swapped():
    lstm = nn.LSTM(4, 8, num_layers=2).eval()
    fast = optimize(lstm)
    assert isinstance(fast, PackedLSTM) and type(lstm) is nn.LSTM
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        assert torch.equal(fast(x)[0], lstm(x)[0])
    assert [d.name for d in plan(lstm)] == [""]


def test_a_shared_lstm_stays_one_shared_packed_module():
    shared = nn.LSTM(4, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(nn.Identity(), shared)})
    fast = optimize(model)
    assert isinstance(fast["a"][0], PackedLSTM) and fast["a"][0] is fast["b"][1]
    (decision,) = plan(model)
    assert decision.name == "a.0" and decision.aliases == ("b.1",)


def test_filter_fn_keeps_excluded_lstms():
    model = Deep()
    fast = optimize(model, filter_fn=lambda module, name: name != "stack.0")
    assert type(fast.stack[0]) is nn.LSTM and isinstance(fast.front[1][0], PackedLSTM)
    reasons = {d.name: d.reason for d in plan(model, filter_fn=lambda m, name: not name.startswith("stack"))}
    assert reasons["stack.0"] == "excluded by filter_fn"


def test_ineligible_dtypes_and_devices_are_kept_with_a_reason():
    model = nn.ModuleDict({"f64": nn.LSTM(4, 8).double(), "meta": nn.LSTM(4, 8, device="meta"),
                           "f16": nn.LSTM(4, 8).half()})
    reasons = {d.name: d.reason for d in plan(model)}
    assert "float64 is not supported" in reasons["f64"]
    assert "meta" in reasons["meta"]
    assert "float16 is not supported" in reasons["f16"]
    assert not any(isinstance(m, PackedLSTM) for m in optimize(model).modules())


@needs_bf16
def test_bf16_request_is_recorded_as_changing_numerics():
    (decision,) = plan(nn.LSTM(4, 8), dtype=torch.bfloat16)
    assert decision.packed and decision.packed_dtype == "bfloat16" and not decision.exact
    assert "changes numerics" in decision.reason


def test_lstms_with_computed_weights_are_kept():
    normed = torch.nn.utils.weight_norm(nn.LSTM(4, 8), name="weight_hh_l0")
    parametrized = torch.nn.utils.parametrizations.weight_norm(nn.LSTM(4, 8), name="weight_hh_l0")
    reasons = {d.name: d.reason for d in plan(nn.ModuleDict({"old": normed, "new": parametrized}))}
    assert reasons["old"] == "weight_hh_l0 is not a parameter (computed by a hook such as weight_norm)"
    assert reasons["new"] == "weight_hh_l0 is not a parameter (computed by a hook such as weight_norm)"


def test_an_already_optimized_model_is_left_as_is():
    fast = optimize(Deep())
    again = optimize(fast)
    assert isinstance(again.stack[0], PackedLSTM)
    assert {d.reason for d in plan(fast) if d.packed} == {"already a PackedLSTM"}


def test_optimized_model_matches_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LSTM(16, 24, num_layers=2, bidirectional=True)).eval()
    fast = optimize(model)
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        assert torch.equal(model(x)[0], fast(x)[0])


@pytest.mark.parametrize("bad", [torch.float16, torch.float64, torch.uint8])
def test_unsupported_target_dtypes_are_rejected(bad):
    with pytest.raises(ValueError, match="torch.float32, torch.bfloat16 or torch.int8"):
        optimize(nn.LSTM(4, 8), dtype=bad)


def test_scripted_modules_and_non_modules_are_rejected():
    with pytest.raises(TypeError, match="TorchScript"):
        optimize(torch.jit.script(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        optimize("model.pt")


def test_packed_lstm_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="GRU is not an nn.LSTM"):
        PackedLSTM.convert_(nn.GRU(4, 8))
    with pytest.raises(ValueError, match="cannot pack this LSTM: weights are tensor subclasses"):
        PackedLSTM.convert_(_with_subclass_weights(nn.LSTM(4, 8)))


def _with_subclass_weights(lstm: nn.LSTM) -> nn.LSTM:
    class Marked(torch.Tensor):
        pass

    for name in lstm._flat_weights_names:
        lstm._parameters[name] = lstm._parameters[name].detach().as_subclass(Marked)
    return lstm


def test_decision_is_a_plain_record():
    (d,) = plan(nn.LSTM(4, 8))
    assert isinstance(d, Decision) and d.to_dict()["reason"] == d.reason


def test_each_torch_class_has_one_kind_and_subclasses_take_their_bases():
    import torch.ao.nn.quantized.dynamic as dynamic

    from lstmopt.rewrite.kinds import handler_for

    class MyGRU(nn.GRU):
        pass

    class MyQuantizedLSTM(dynamic.LSTM):
        pass

    kinds = {m: getattr(handler_for(m), "kind", None) for m in [
        nn.LSTM(2, 3), PackedLSTM(2, 3), Custom(2, 3), MyGRU(2, 3), nn.LSTMCell(2, 3), nn.GRUCell(2, 3),
        nn.RNN(2, 3), nn.RNN(2, 3, nonlinearity="relu")]}
    assert list(kinds.values()) == ["LSTM", "LSTM", "LSTM", "GRU", "LSTMCell", "GRUCell", "RNN", "RNN"]
    assert handler_for(nn.Linear(2, 3)) is None
    assert type(handler_for(dynamic.LSTM(2, 3))).__name__ == "QuantizedHandler"
    assert handler_for(MyQuantizedLSTM(2, 3)) is None  # its own code may compute otherwise: left as it is


def test_messages_name_every_torch_class_the_registry_packs():
    from lstmopt.choices import RECURRENT_CLASSES
    from lstmopt.rewrite import kinds, quantized

    torch_classes = set(kinds.handlers()) - set(quantized.quantized_classes())
    assert sorted(RECURRENT_CLASSES.replace(" or ", ", ").split(", ")) == sorted(
        f"nn.{cls.__name__}" for cls in torch_classes)


def test_plan_and_optimize_ask_the_registry_so_a_new_kind_is_one_handler(monkeypatch):
    from dataclasses import replace

    from lstmopt.rewrite import kinds
    from lstmopt.rewrite.kinds.handler import Handler

    class Doubler(nn.Module):
        def forward(self, x):
            return 2 * x

    class Halver(nn.Module):  # what the new kind is swapped for
        def forward(self, x):
            return x / 2

    converted = []

    class DoublerHandler(Handler):
        kind = "Doubler"

        def decide(self, module, name, aliases, request):
            template = plan(nn.LSTM(1, 1))[0]
            return replace(template, name=name, aliases=aliases, kind=self.kind, reason="doubled", packed=True)

        def convert(self, model, decision, request):
            converted.append(decision.name)
            model.get_submodule(decision.name.rpartition(".")[0])._modules[decision.name.rpartition(".")[2]] = Halver()

    monkeypatch.setitem(kinds.handlers(), Doubler, DoublerHandler())
    model = nn.Sequential(nn.Linear(2, 2), Doubler(), nn.LSTM(2, 2))
    assert [(d.name, d.kind, d.reason) for d in plan(model)] == [
        ("1", "Doubler", "doubled"), ("2", "LSTM", "bit-identical to eager")]
    fast = optimize(model)
    assert converted == ["1"] and isinstance(fast[1], Halver) and isinstance(fast[2], PackedLSTM)
    assert isinstance(model[1], Doubler)  # optimize works on a copy
