"""Loading saved models: formats by content, weights-only by default, one-line errors for bad input."""

import pathlib
import sys
import zipfile

import pytest
import torch

from lstmopt.errors import UntrustedPickleError, UsageError
from lstmopt.artifacts.files import sha256_file
from lstmopt.artifacts.loading import detect_format, load_model
from models import Tagger, build_tagger

FACTORY = "models:build_tagger"


@pytest.fixture
def state_dict_file(tmp_path):
    path = tmp_path / "tagger.pt"
    torch.save(build_tagger().state_dict(), path)
    return path


@pytest.fixture
def pickled_file(tmp_path):
    path = tmp_path / "tagger_full.pt"
    torch.save(build_tagger(), path)
    return path


def test_state_dict_with_factory_loads_in_eval_mode(state_dict_file):
    loaded = load_model(state_dict_file, factory=FACTORY)
    assert isinstance(loaded.model, Tagger) and not loaded.model.training
    assert loaded.format == "state_dict" and loaded.sha256 == sha256_file(state_dict_file)
    expected = build_tagger().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())


def test_factory_kwargs_are_passed(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(build_tagger(hidden=8).state_dict(), path)
    assert load_model(path, factory=FACTORY, factory_kwargs={"hidden": 8}).model.lstm.hidden_size == 8


def test_training_checkpoint_with_a_state_dict_key_loads(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": build_tagger().state_dict(), "epoch": 3}, path)
    assert isinstance(load_model(path, factory=FACTORY).model, Tagger)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.bin"  # recognised by content, not by extension
    save_file(build_tagger().state_dict(), path)
    assert detect_format(path) == "safetensors"
    assert load_model(path, factory=FACTORY).format == "safetensors"


def test_safetensors_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(build_tagger().state_dict(), path)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UsageError, match="install safetensors"):
        load_model(path, factory=FACTORY)


def test_legacy_format_state_dict_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(build_tagger().state_dict(), path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "legacy_pickle"
    assert isinstance(load_model(path, factory=FACTORY).model, Tagger)


def test_state_dict_without_factory_asks_for_one(state_dict_file):
    with pytest.raises(UsageError, match=r"holds only weights .*--factory package.module:callable"):
        load_model(state_dict_file)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = build_tagger().state_dict()
    del state["out.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"missing keys: out\.bias; unexpected keys: extra\.weight"):
        load_model(path, factory=FACTORY)


def test_weights_of_a_wrapped_module_name_the_factory_to_use(tmp_path, monkeypatch):
    # The factory wraps the model the checkpoint was saved from: its keys gain a prefix.
    module = tmp_path / "wrapping.py"
    module.write_text("import torch\nfrom models import build_tagger\n\n"
                      "class Wrapper(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                      "        self.net = build_tagger()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "inner.pt"
    torch.save(build_tagger().state_dict(), path)
    with pytest.raises(UsageError, match=r"the model's keys all start with 'net\.'.*a factory that returns that "
                                         r"module \(the wrapper's \.net\) instead"):
        load_model(path, factory="wrapping:Wrapper")


def test_shape_mismatch_is_reported(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_tagger(hidden=8).state_dict(), path)
    with pytest.raises(UsageError, match=r"size mismatch for lstm\.weight_ih_l0"):
        load_model(path, factory=FACTORY)


@pytest.mark.parametrize("factory, message", [
    ("no_colon", "must look like package.module:callable"),
    ("no_such_module:build", "cannot import 'no_such_module'"),
    ("models:no_such_function", "has no attribute 'no_such_function'"),
    ("models:Tagger.nope", "has no attribute 'Tagger.nope'"),
])
def test_bad_factories_are_named(state_dict_file, factory, message):
    with pytest.raises(UsageError, match=message):
        load_model(state_dict_file, factory=factory)


def test_factory_that_fails_or_returns_a_non_module(state_dict_file):
    with pytest.raises(UsageError, match=r"failed: TypeError: .*unexpected keyword argument 'bogus'"):
        load_model(state_dict_file, factory=FACTORY, factory_kwargs={"bogus": 1})
    with pytest.raises(UsageError, match="returned Fraction, not a torch.nn.Module"):
        load_model(state_dict_file, factory="fractions:Fraction", factory_kwargs={"numerator": 3})


def test_pickled_module_is_refused_without_trust_and_names_its_classes(pickled_file):
    with pytest.raises(UntrustedPickleError) as info:
        load_model(pickled_file)
    message = str(info.value)
    assert "loading it runs code" in message and "--trust" in message
    assert "models.Tagger" in message and "torch.nn.modules.rnn.LSTM" in message
    assert "\n" not in message


def test_trusted_pickled_module_loads(pickled_file):
    loaded = load_model(pickled_file, trust=True)
    assert isinstance(loaded.model, Tagger) and loaded.format == "pickled_module"


def test_trusted_pickle_needing_an_unimportable_class_names_it(tmp_path, monkeypatch):
    package = tmp_path / "vanishing_models.py"
    package.write_text("import torch\nclass Net(torch.nn.Module):\n"
                       "    def __init__(self):\n        super().__init__()\n        self.lstm = torch.nn.LSTM(2, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_models

    path = tmp_path / "net.pt"
    torch.save(vanishing_models.Net(), path)
    package.unlink()
    monkeypatch.delitem(sys.modules, "vanishing_models")
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(UsageError, match=r"needs vanishing_models.*not importable.*PYTHONPATH"):
        load_model(path, trust=True)


def test_pickled_module_with_a_factory_is_ambiguous(pickled_file):
    with pytest.raises(UsageError, match="drop --factory"):
        load_model(pickled_file, factory=FACTORY, trust=True)


def test_legacy_pickled_module_is_refused(tmp_path):
    path = tmp_path / "legacy_full.pt"
    torch.save(build_tagger(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedPickleError, match="--trust"):
        load_model(path)
    assert isinstance(load_model(path, trust=True).model, Tagger)


def test_torchscript_archive_is_refused_with_what_to_provide(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.LSTMCell(2, 2)), str(path))  # a module, not an "LSTM"
    with pytest.raises(UsageError, match=r"TorchScript archive: its modules are compiled.*provide the original model"):
        load_model(path, factory=FACTORY)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, b"x")
    return path


def _npy(path):
    import numpy as np

    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.zeros(3))
    return path


def _npz(path):
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, a=np.zeros(3))
    return path


def _truncated(path, state_dict_file):
    data = state_dict_file.read_bytes()
    return _write(path, data[: len(data) // 2])


def _garbled(path, state_dict_file):
    data = bytearray(state_dict_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    return _write(path, bytes(data))


@pytest.mark.parametrize("make, message", [
    (lambda p, s: _write(p, b""), "is empty"),
    (lambda p, s: _write(p, b"hello, this is not a model\n"), "is a text file"),
    (lambda p, s: _write(p, b'{"weights": [1, 2]}'), "looks like JSON"),
    (lambda p, s: _write(p, bytes(range(256)) * 4), "not a PyTorch file"),
    (lambda p, s: _zip(p, ["readme.txt"]), "zip archive but not a PyTorch model"),
    (lambda p, s: _npy(p), "NumPy array file"),
    (lambda p, s: _npz(p), "NumPy .npz archive"),
    (lambda p, s: _truncated(p, s), "corrupt or truncated"),
    (lambda p, s: _garbled(p, s), "corrupt"),
])
def test_bad_files_give_one_line_errors(tmp_path, state_dict_file, make, message):
    path = make(tmp_path / "input.pt", state_dict_file)
    with pytest.raises(UsageError) as info:
        load_model(path, factory=FACTORY)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_files_and_directories_are_named(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(UsageError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_what_a_pickle_holds_is_read_without_unpickling_it_at_every_protocol(tmp_path, protocol):
    from lstmopt.artifacts.pickles import read_contents

    module, checkpoint = tmp_path / "module.pt", tmp_path / "checkpoint.pt"
    torch.save(build_tagger(), module, pickle_protocol=protocol)
    torch.save({"state_dict": build_tagger().state_dict(), "where": pathlib.PurePosixPath("/data")}, checkpoint,
               pickle_protocol=protocol)
    held = read_contents(module)
    assert held.root == "models.Tagger" and held.describe() == "a models.Tagger object" and held.protocol == protocol
    assert "models.Tagger" in held.unsafe_globals() and "torch.nn.modules.rnn.LSTM" in held.globals_
    held = read_contents(checkpoint)
    assert held.root_is_mapping and held.unsafe_globals() == ["pathlib.PurePosixPath"]
    assert held.weights_only_readable is False


def test_a_package_save_file_pickled_with_protocol_4_says_what_it_holds_and_loads_with_trust(tmp_path):
    path = tmp_path / "lm.pt"  # flair's LanguageModel.save(): a dict of weights and objects, protocol 4
    torch.save({"state_dict": build_tagger().state_dict(), "dictionary": pathlib.PurePosixPath("/vocab")}, path,
               pickle_protocol=4)
    with pytest.raises(UntrustedPickleError, match=r"holds a dict with Python objects besides tensors "
                                                   r"\(pathlib.PurePosixPath\).*--trust"):
        load_model(path, factory=FACTORY)
    with pytest.raises(UsageError, match=r"holds a dict with Python objects besides tensors.*not a module: pass "
                                         r"--factory"):
        load_model(path, trust=True)
    loaded = load_model(path, factory=FACTORY, trust=True)
    assert isinstance(loaded.model, Tagger) and loaded.state_dict_key == "state_dict"


def test_a_state_dict_saved_with_protocol_5_needs_trust_because_the_weights_only_loader_cannot_read_it(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_tagger().state_dict(), path, pickle_protocol=5)
    with pytest.raises(UntrustedPickleError, match="saved with pickle protocol 5, which torch's weights-only loader "
                                                   "cannot read.*--trust"):
        load_model(path, factory=FACTORY)
    assert isinstance(load_model(path, factory=FACTORY, trust=True).model, Tagger)


def test_a_pickled_module_is_refused_naming_its_class_and_loads_with_trust(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(build_tagger(), path, pickle_protocol=5)
    with pytest.raises(UntrustedPickleError, match=r"is a pickled module \(a models.Tagger object\).*it needs "
                                                   r"models.Tagger"):
        load_model(path)
    assert isinstance(load_model(path, trust=True).model, Tagger)
