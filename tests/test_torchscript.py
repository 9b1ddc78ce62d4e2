"""A scripted model with PackedLSTMs: same results, saved dense, repacked when loaded without lstmopt."""

import pytest
import torch

from conftest import needs_bf16, run_python_json
from lstmopt import optimize
from models import Encoder, Tagger


def scripted(model):
    return torch.jit.script(optimize(model.eval()))


def test_scripted_encoder_matches_eager_at_every_shape():
    torch.manual_seed(0)
    model = Encoder().eval()
    fast = scripted(model)
    with torch.no_grad():
        for batch, steps in [(1, 1), (4, 9), (2, 40)]:
            x = torch.randn(batch, steps, 16)
            state = (torch.randn(2, batch, 32), torch.randn(2, batch, 32))
            for args in [(x,), (x, state)]:
                (y_e, (h_e, c_e)), (y_f, (h_f, c_f)) = model(*args), fast(*args)
                assert torch.equal(y_e, y_f) and torch.equal(h_e, h_f) and torch.equal(c_e, c_f)


def test_scripted_packed_sequence_path_matches_eager():
    torch.manual_seed(0)
    model = Tagger().eval()
    fast = scripted(model)
    tokens, lengths = torch.randint(0, 50, (4, 11)), torch.tensor([11, 3, 7, 1])
    with torch.no_grad():
        assert torch.equal(model(tokens, lengths), fast(tokens, lengths))


def test_scripted_grad_mode_takes_the_stock_path_and_backpropagates_to_inputs():
    # A scripted artifact keeps its LSTM weights packed only: it differentiates through its inputs
    # (saliency, adversarial checks), not into the LSTM weights (it is not meant for training).
    torch.manual_seed(0)
    model = Encoder().eval()
    fast = scripted(model)
    x_e = torch.randn(3, 5, 16, requires_grad=True)
    x_f = x_e.detach().clone().requires_grad_(True)
    y_e, _ = model(x_e)
    y_f, _ = fast(x_f)
    assert y_f.requires_grad and torch.equal(y_e, y_f)
    y_f.sum().backward()
    y_e.sum().backward()
    assert torch.equal(x_f.grad, x_e.grad)
    assert torch.equal(fast.head.weight.grad, model.head.weight.grad)


@needs_bf16
def test_scripted_bf16_lstm_casts_at_its_boundary():
    torch.manual_seed(0)
    model = Encoder().eval()
    fast = torch.jit.script(optimize(model, dtype=torch.bfloat16))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y_f, (h_f, _) = fast(x)
        y_e, (h_e, _) = model(x)
    assert y_f.dtype == h_f.dtype == torch.float32
    torch.testing.assert_close(y_f, y_e, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("model_cls", [Encoder, Tagger])
def test_saved_archive_loads_and_repacks_in_a_process_without_lstmopt(tmp_path, model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    fast = scripted(model)
    if model_cls is Encoder:
        cases = [(torch.randn(b, t, 16),) for b, t in [(1, 1), (3, 17), (8, 5)]]
    else:
        cases = [(torch.randint(0, 50, (b, t)), torch.randint(1, t + 1, (b,))) for b, t in [(1, 4), (5, 9)]]
    with torch.no_grad():
        expected = [model(*args) for args in cases]
    fast.save(str(tmp_path / "model.pt"))
    torch.save({"cases": cases, "expected": expected}, tmp_path / "io.pt")
    result = run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None  # the archive must not need lstmopt
        import torch
        try:
            import lstmopt
            importable = True
        except ImportError:
            importable = False
        m = torch.jit.load({str(tmp_path / 'model.pt')!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        equal = []
        with torch.no_grad():
            for args, exp in zip(io["cases"], io["expected"]):
                got = m(*args)
                got, exp = (got[0], exp[0]) if isinstance(got, tuple) else (got, exp)
                equal.append(torch.equal(got, exp))
        layers = [mod for name, mod in m.named_modules() if name.endswith("packed_layers.0")]
        print(json.dumps({{"importable": importable, "equal": equal,
                           "repacked": all(l.is_packed() for l in layers) and bool(layers)}}))
    """, cwd=tmp_path)
    assert result["importable"] is False
    assert result["repacked"] is True
    assert all(result["equal"]) and result["equal"]


def _torchscript_ends(monkeypatch):
    """torch.jit's entry points raising, as pytorch/pytorch#189705 makes them (its message, unchanged)."""
    for name in ("script", "trace", "save", "load", "freeze"):
        def refuse(*args, name=name, **kwargs):
            raise RuntimeError(f"`torch.jit.{name}` is deprecated. Please switch to `torch.compile` or `torch.export`.")
        monkeypatch.setattr(torch.jit, name, refuse)


@pytest.mark.skipif(not __import__("conftest").NATIVE, reason="native kernel unavailable")
def test_where_torchscript_is_gone_the_default_writes_a_program_and_says_why(tmp_path, monkeypatch):
    from lstmopt.job.pipeline import OptimizeOptions, optimize_file
    from models import build_forecaster

    monkeypatch.chdir(tmp_path)
    torch.save(build_forecaster().state_dict(), "w.pt")
    _torchscript_ends(monkeypatch)
    report = optimize_file(OptimizeOptions(input="w.pt", output="out.pt", factory="models:build_forecaster",
                                           input_shape=(2, 8, 3)))
    assert report.status == "ok", report.error
    assert report.output["format"] == "pt2"
    (blocker,) = report.artifact["blockers"]
    assert blocker["reason"].startswith("this torch has no TorchScript (`torch.jit.script` is deprecated.")


@pytest.mark.skipif(not __import__("conftest").NATIVE, reason="native kernel unavailable")
def test_where_torchscript_is_gone_asking_for_it_is_a_one_line_error_that_names_the_format_to_use(tmp_path,
                                                                                                monkeypatch):
    from conftest import invoke
    from models import build_forecaster

    monkeypatch.chdir(tmp_path)
    torch.save(build_forecaster().state_dict(), "w.pt")
    _torchscript_ends(monkeypatch)
    result = invoke("optimize", "w.pt", "-o", "out.pt", "--factory", "models:build_forecaster", "--input-shape",
                    "2,8,3", "--format", "torchscript")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: this torch has no TorchScript (`torch.jit.script` is deprecated.")
    assert "write --format aoti or pt2" in line and "--format pt2 writes a verified artifact" in line
    assert not (tmp_path / "out.pt").exists()


def test_torch_refusing_torchscript_is_told_from_a_model_torchscript_cannot_compile():
    from lstmopt.artifacts.scripting import torchscript_gone

    assert torchscript_gone(RuntimeError("`torch.jit.load` is deprecated. Please switch to `torch.export`."))
    assert torchscript_gone("RuntimeError: `torch.jit.load` is deprecated. Please switch to `torch.export`.")
    assert torchscript_gone(AttributeError("module 'torch.jit' has no attribute 'script'"))
    assert not torchscript_gone(RuntimeError("Comprehension ifs are not supported yet"))
    assert not torchscript_gone(RuntimeError("Module 'MetricCollection' has no attribute '_groups'"))
