"""``--format pt2``: torch.export programs on lstmopt's dense ops (lstmopt/artifacts/program.py,
lstmopt/kernels/csrc/dense.cpp): the results of the optimized model at any batch and length, true
weights in the state dict, packs made where the program runs, and clear errors for bad input."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import invoke, needs_native, run_python, run_python_json
from lstmopt import native, optimize
from lstmopt.artifacts.program import calls_lstmopt_ops, dynamic_dims, export_program
from models import build_forecaster

pytestmark = needs_native


class Stream(nn.Module):
    """An LSTM or GRU under a linear read-out, batch first."""

    def __init__(self, kind=nn.LSTM, **config):
        super().__init__()
        self.rnn = kind(batch_first=True, **config)
        self.out = nn.Linear(config["hidden_size"] * (2 if config.get("bidirectional") else 1)
                             if not config.get("proj_size") else config["proj_size"], 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


def _saved_and_loaded(program, tmp_path):
    torch.export.save(program, tmp_path / "m.pt2")
    return torch.export.load(tmp_path / "m.pt2").module()


@settings(max_examples=12, deadline=None)
@given(config=st.fixed_dictionaries({"input_size": st.sampled_from([3, 8]), "hidden_size": st.sampled_from([5, 16]),
                                     "num_layers": st.integers(1, 2), "bidirectional": st.booleans(),
                                     "bias": st.booleans()}),
       kernel=st.sampled_from(["onednn", "native"]), sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 9)),
                                                                   min_size=1, max_size=3))
def test_a_program_computes_what_the_optimized_model_does_at_every_batch_and_length(config, kernel, sizes):
    torch.manual_seed(0)
    model = Stream(**config).eval()
    fast = optimize(model)
    fast.rnn.use_kernel(kernel)
    program = export_program(fast, (torch.randn(2, 4, config["input_size"]),))
    assert calls_lstmopt_ops(program) and dynamic_dims(program) == [[0, 1]]
    run = program.module()
    with torch.no_grad():
        for batch, steps in sizes:
            x = torch.randn(batch, steps, config["input_size"])
            if kernel == "onednn":  # the default kernel: bit-identical, as the optimized model is
                assert torch.equal(run(x), model(x))
            else:
                torch.testing.assert_close(run(x), fast(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind, config", [(nn.GRU, {"input_size": 6, "hidden_size": 20, "num_layers": 2}),
                                          (nn.RNN, {"input_size": 6, "hidden_size": 70, "num_layers": 2,
                                                    "nonlinearity": "relu"}),
                                          (nn.LSTM, {"input_size": 6, "hidden_size": 20, "proj_size": 7})],
                         ids=["GRU", "RNN", "LSTMP"])
def test_native_kernel_grus_rnns_and_lstmps_are_recorded_as_lstmopt_ops(kind, config):
    torch.manual_seed(0)
    model = Stream(kind, **config).eval()
    fast = optimize(model, exact=False)
    program = export_program(fast, (torch.randn(2, 4, 6),))
    assert calls_lstmopt_ops(program)
    x = torch.randn(3, 11, 6)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-6, rtol=1e-6)


def test_the_state_dict_holds_the_true_weights_and_the_ops_repack_after_an_edit(tmp_path):
    torch.manual_seed(0)
    model = Stream(input_size=4, hidden_size=12, num_layers=2).eval()
    program = export_program(optimize(model), (torch.randn(2, 5, 4),))
    # The parameters themselves, not constant copies of them beside the parameters.
    assert {s.kind.name for s in program.graph_signature.input_specs} == {"PARAMETER", "USER_INPUT"}
    for name, value in model.state_dict().items():
        assert torch.equal(program.state_dict[name], value)
    run = _saved_and_loaded(program, tmp_path)
    x = torch.randn(3, 6, 4)
    with torch.no_grad():
        run(x)  # packs made
        run.rnn.weight_hh_l1.mul_(0.5)  # an in-place edit: the version moves, the packs are remade
        model.rnn.weight_hh_l1.mul_(0.5)
        assert torch.equal(run(x), model(x))


def test_a_program_loads_with_torch_and_the_library_alone(tmp_path):
    torch.manual_seed(0)
    model = build_forecaster().eval()
    fast = optimize(model)
    fast.decoder.use_kernel("native")
    torch.export.save(export_program(fast, (torch.randn(2, 7, 3),)), tmp_path / "m.pt2")
    x = torch.randn(4, 9, 3)
    torch.save(x, tmp_path / "x.pt")
    load = f"""
        import sys
        sys.modules["lstmopt"] = None
        import torch
        {{}}
        program = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()
        with torch.inference_mode():
            torch.save(program(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
        print('"{{}}"')
    """
    without = run_python(load.format("", "loaded"))
    assert without.returncode != 0 and "torch.ops.lstmopt." in without.stderr
    assert run_python_json(load.format(f"torch.ops.load_library({native.library_path()!r})", "ran")) == "ran"
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), atol=1e-6, rtol=1e-6)


def test_a_loaded_program_can_be_traced_again_where_only_the_library_is_loaded(tmp_path):
    torch.manual_seed(0)
    torch.export.save(export_program(optimize(Stream(input_size=4, hidden_size=8).eval()), (torch.randn(2, 3, 4),)),
                      tmp_path / "m.pt2")
    result = run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None
        import torch
        from torch.export import Dim
        torch.ops.load_library({native.library_path()!r})
        module = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()
        again = torch.export.export(module, (torch.randn(3, 5, 4),), dynamic_shapes=({{0: Dim.AUTO, 1: Dim.AUTO}},))
        ops = [str(n.target) for n in again.graph.nodes if "lstmopt" in str(n.target)]
        print(json.dumps([ops, list(again.module()(torch.randn(6, 2, 4)).shape)]))
    """)
    assert result == [["lstmopt.onednn_lstm_dense.default"], [6, 2, 3]]


def test_without_the_native_library_a_program_is_nn_lstms_graph_that_needs_torch_only(tmp_path):
    result = run_python_json("""
        import json, torch
        from torch import nn
        from lstmopt import optimize
        from lstmopt.artifacts.program import calls_lstmopt_ops, export_program
        program = export_program(optimize(nn.LSTM(4, 8).eval()), (torch.randn(3, 2, 4),))
        print(json.dumps(calls_lstmopt_ops(program)))
    """, env_extra={"LSTMOPT_NO_NATIVE": "1"})
    assert result is False


# (input, weights, state) as Python expressions, and what the error says.
BAD_CALLS = {
    "no batch": ("x[:0]", "weights", "None", "the input holds no steps or no batch"),
    "no steps": ("x[:, :0]", "weights", "None", "the input holds no steps or no batch"),
    "other features": ("torch.randn(2, 5, 7)", "weights", "None", "must be float32 of size [64, 7]"),
    "float64": ("x.double()", "weights", "None", "input must be a 2-D or 3-D float32 CPU tensor"),
    "a weight short": ("x", "weights[:-1]", "None", "expected the flat weights of 1 layers"),
    "a bias of the wrong size": ("x", "weights[:3] + [torch.zeros(5)]", "None",
                                 "weight 3 of layer 0 must be float32 of size [64]"),
    "a state of another batch": ("x", "weights", "torch.zeros(1, 3, 16)", "expected a state of size [1, 2, 16]"),
}


@pytest.mark.parametrize("op", ["onednn_lstm_dense", "lstm_dense"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_bad_call_of_a_dense_op_raises_a_clear_error_and_never_crashes(op, case):
    x, weights, state, message = BAD_CALLS[case]
    result = run_python_json(f"""
        import json, torch
        from lstmopt import native
        native.load()
        lstm = torch.nn.LSTM(4, 16, batch_first=True)
        weights = list(lstm._flat_weights)
        x = torch.randn(2, 5, 4)
        state = {state}
        try:
            torch.ops.lstmopt.{op}({x}, state, state, {weights}, 16, 1, False, True, True)
            print(json.dumps("no error"))
        except RuntimeError as exc:
            print(json.dumps(str(exc).splitlines()[0]))
    """)
    assert message in result


@pytest.mark.parametrize("fmt", ["pt2", "aoti"])
def test_optimize_writes_a_verified_program_that_verify_checks_with_trust(tmp_path, monkeypatch, fmt):
    import models

    monkeypatch.chdir(tmp_path)
    torch.save(models.build_forecaster().state_dict(), "w.pt")
    args = ["--factory", "models:build_forecaster", "--input-shape", "2,7,3"]
    result = invoke("optimize", "w.pt", "-o", "out.pt2", "--format", fmt, "--autotune", "--approx", *args, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"]["format"] == fmt and report["verification"]["ok"]
    assert report["artifact"]["method"] == {"pt2": "exported", "aoti": "compiled"}[fmt]
    assert report["artifact"]["lstmopt_ops"] is True and report["artifact"]["dynamic_dims"] == [[0, 1]]
    assert any("torch.ops.load_library(" in warning for warning in report["warnings"])
    refused = invoke("verify", "w.pt", "out.pt2", *args)
    what = {"pt2": "a torch.export program", "aoti": "an AOTInductor package"}[fmt]
    assert refused.exit_code == 3 and what in refused.stderr and "--trust" in refused.stderr
    checked = invoke("verify", "w.pt", "out.pt2", *args, "--trust", "--json")
    assert checked.exit_code == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"]
    as_input = invoke("optimize", "out.pt2", "-o", "again.pt")
    assert as_input.exit_code != 0 and what in as_input.stderr
    # Where it runs: torch and the library, no lstmopt.
    x = torch.randn(5, 12, 3)
    torch.save(x, "x.pt")
    loader = "torch.export.load(f).module()" if fmt == "pt2" else "torch._inductor.aoti_load_package(f)"
    proc = run_python(f"""
        import io, sys
        sys.modules["lstmopt"] = None
        import torch
        torch.ops.load_library({native.library_path()!r})
        f = io.BytesIO(open("out.pt2", "rb").read())
        program = {loader}
        with torch.inference_mode():
            torch.save(program(torch.load("x.pt")), "y.pt")
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load("y.pt"), models.build_forecaster()(x), atol=1e-6, rtol=1e-6)
