"""Writing artifacts: both formats, metadata readable without loading, atomic, never over the input."""

import pytest
import torch

from conftest import ROOT, run_python_json
from lstmopt import optimize
from lstmopt.errors import UsageError
from lstmopt.artifacts.files import stale_temp_files
from lstmopt.artifacts.writing import read_metadata, write_artifact
from models import Encoder, Unscriptable, build_speech_encoder

METADATA = {"schema": "lstmopt.artifact/1", "dtype": "float32", "source": {"sha256": "ab" * 32}}


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_metadata_reads_back_without_loading_the_model(tmp_path, fmt):
    out = write_artifact(optimize(Encoder()), tmp_path / "m.pt", format=fmt, metadata=METADATA)
    expected = dict(METADATA, native_kernel=[])  # no LSTM needs the native library to load
    if fmt == "torchscript":  # and how it was made, and where its modules are in the archive
        expected["torchscript"] = {"method": "scripted", "reason": "the model's code is scriptable",
                                   "native_kernel": [], "module_prefix": ""}
        expected["module_prefix"] = ""
    assert read_metadata(out) == expected


def test_torchscript_of_a_bare_lstm_gets_an_entry_point(tmp_path):
    lstm = torch.nn.LSTM(4, 8, batch_first=True).eval()
    out = write_artifact(optimize(lstm), tmp_path / "lstm.pt", format="torchscript", metadata=METADATA)
    loaded = torch.jit.load(str(out))
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], lstm(x)[0])


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_artifact_is_in_eval_mode_with_its_weights_as_they_were(tmp_path, fmt):
    model = Encoder().train()
    model.head.requires_grad_(False)
    out = write_artifact(optimize(model), tmp_path / "m.pt", format=fmt, metadata=METADATA)
    loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.load(out, weights_only=False)
    assert not loaded.training
    # requires_grad is kept: freezing weights would change how matmul folds batched inputs elsewhere
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()}


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists; pass --force"):
        write_artifact(optimize(Encoder()), out, format="pickle", metadata=METADATA)
    assert out.read_bytes() == b"keep me"
    write_artifact(optimize(Encoder()), out, format="pickle", metadata=METADATA, force=True)
    assert read_metadata(out) == dict(METADATA, native_kernel=[])


def test_the_input_is_never_the_output(tmp_path):
    source = tmp_path / "in.pt"
    torch.save(Encoder().state_dict(), source)
    before = source.read_bytes()
    with pytest.raises(UsageError, match="is the input file"):
        write_artifact(optimize(Encoder()), source, format="pickle", metadata=METADATA, force=True,
                       inputs=(source,))
    assert source.read_bytes() == before


def test_unwritable_or_missing_directories_are_reported(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        write_artifact(optimize(Encoder()), tmp_path / "nope" / "m.pt", format="pickle", metadata=METADATA)
    with pytest.raises(UsageError, match="is a directory"):
        write_artifact(optimize(Encoder()), tmp_path, format="pickle", metadata=METADATA)
    with pytest.raises(UsageError, match="cannot write /sys/m.pt"):  # read-only even for root
        write_artifact(optimize(Encoder()), "/sys/m.pt", format="pickle", metadata=METADATA)


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_nothing(tmp_path, monkeypatch, interruption):
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a partial file exists now
        raise interruption

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(type(interruption)):
        write_artifact(optimize(Encoder()), tmp_path / "m.pt", format="pickle", metadata=METADATA)
    assert list(tmp_path.iterdir()) == []
    assert stale_temp_files(tmp_path / "m.pt") == []


def test_unscriptable_code_is_named_and_the_formats_that_need_no_scripting_suggested(tmp_path):
    with pytest.raises(UsageError) as info:
        write_artifact(optimize(Unscriptable()), tmp_path / "m.pt", format="torchscript", metadata=METADATA)
    message = str(info.value)
    assert "not scriptable" in message and "models.py:" in message and "**options" in message
    assert "--format pt2 or pickle" in message and "\n" not in message
    assert not (tmp_path / "m.pt").exists()


def test_torchscript_artifact_repacks_on_load_without_lstmopt(tmp_path):
    model = build_speech_encoder().eval()
    out = write_artifact(optimize(model), tmp_path / "m.pt", format="torchscript", metadata=METADATA)
    x = torch.randn(3, 20, 40)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    result = run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None
        import torch
        m = torch.jit.load({str(out)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        layers = [mod for name, mod in m.named_modules() if ".packed_layers." in name]
        with torch.no_grad():
            print(json.dumps({{"equal": torch.equal(m(io["x"]), io["y"]),
                               "packed": all(l.is_packed() for l in layers), "layers": len(layers)}}))
    """, cwd=tmp_path)
    assert result == {"equal": True, "packed": True, "layers": 6}


def test_lstmopt_never_sets_the_umask_while_other_threads_may_create_files(tmp_path):
    """os.umask can only be read by setting it: a file another thread creates in that window gets mode 0666.
    Importing lstmopt's writers and writing an artifact read it without setting it, and outputs still get
    the mode open() would give them."""
    result = run_python_json(f"""
        import json, os
        calls = []
        real = os.umask
        os.umask = lambda mask: calls.append(mask) or real(mask)
        real(0o027)
        import torch
        from lstmopt import optimize
        from lstmopt.artifacts.writing import write_artifact
        from models import Encoder
        path = write_artifact(optimize(Encoder()), {str(tmp_path / 'm.pt')!r}, format="pickle", metadata={{}})
        print(json.dumps([calls, oct(os.stat(path).st_mode & 0o777)]))
    """, cwd=ROOT / "tests")
    assert result == [[], "0o640"]
