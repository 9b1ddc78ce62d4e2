"""Artifacts written before the package layout changed still load and compute what they did.

``tests/data/forecaster-main-78d9f1b.*`` were written by lstmopt at commit 78d9f1b (flat modules:
``lstmopt.packed.PackedLSTM``, ``lstmopt.packing.PackedLayer``, ``lstmopt.native``); a pickle names those
paths, so they must keep resolving, to the very classes lstmopt uses now. ``expected.pt`` holds what they
computed on the machine that wrote them; another CPU's oneDNN gives other last bits, so bit-identity is
checked against eager on this machine, and the stored outputs within float32 rounding.
"""

import copy
import pickletools
import zipfile

import pytest
import torch

from conftest import ROOT, needs_native

DATA = ROOT / "tests" / "data"
EXPECTED = torch.load(DATA / "forecaster-main-78d9f1b.expected.pt", weights_only=True)


def _eager_here(model, x=None):
    """``model``'s output on ``x`` (EXPECTED's input) with every LSTM on nn.LSTM's own path: eager, on this machine."""
    from lstmopt.modules.lstm import PackedLSTM

    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, PackedLSTM):
            module.use_kernel("stock", sequence_kernel="stock")
    with torch.no_grad():
        return eager(EXPECTED["input"] if x is None else x)


def _globals(path):
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("name", ["pickle", pytest.param("native.pickle", marks=needs_native)])
def test_a_pickled_artifact_of_the_flat_layout_loads_and_computes_the_same(name):
    from lstmopt.modules.lstm import PackedLSTM

    path = DATA / f"forecaster-main-78d9f1b.{name}.pt"
    assert {"lstmopt.packed PackedLSTM", "lstmopt.packing PackedLayer"} <= _globals(path)  # the old paths it names
    model = torch.load(path, weights_only=False)
    assert all(type(m) is PackedLSTM for m in (model.encoder, model.decoder))
    with torch.no_grad():
        output = model(EXPECTED["input"])
    tolerance = dict(atol=0, rtol=0) if name == "pickle" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, _eager_here(model), **tolerance)
    torch.testing.assert_close(output, EXPECTED["output"], atol=1e-5, rtol=1e-5)
    if name == "native.pickle":
        assert model.encoder.kernel == "native"  # and it runs the kernel it was written with


def test_a_torchscript_artifact_of_the_flat_layout_loads_with_torch_alone():
    model = torch.jit.load(str(DATA / "forecaster-main-78d9f1b.torchscript.pt"))
    with torch.no_grad():
        output = model(EXPECTED["input"])
    eager = _eager_here(torch.load(DATA / "forecaster-main-78d9f1b.pickle.pt", weights_only=False))  # same weights
    torch.testing.assert_close(output, eager, atol=0, rtol=0)
    torch.testing.assert_close(output, EXPECTED["output"], atol=1e-5, rtol=1e-5)


def test_the_old_import_paths_and_load_line_are_the_new_modules():
    import lstmopt.kernels.native
    import lstmopt.modules.lstm
    import lstmopt.modules.packs
    from lstmopt import native, packed, packing
    from lstmopt.native import LOAD_LINE

    assert (packed, packing, native) == (lstmopt.modules.lstm, lstmopt.modules.packs, lstmopt.kernels.native)
    assert LOAD_LINE == "import lstmopt.native; lstmopt.native.load()"
    exec(LOAD_LINE, {})


# Artifacts written by tools/compat_artifacts.py under each supported torch release: each loads and computes the
# same under every other (the suite runs under each release in CI).
RELEASES = ["2.13", "2.14"]


def _across(release: str, fmt: str):
    expected = torch.load(DATA / f"forecaster-torch{release}.expected.pt", weights_only=True)
    path = DATA / f"forecaster-torch{release}.{fmt}.pt"
    return path, expected


def _pickled_forecaster(release: str):
    return torch.load(DATA / f"forecaster-torch{release}.pickle.pt", weights_only=False)


def _loaded(path, fmt):
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "pt2":
        import io

        return torch.export.load(io.BytesIO(path.read_bytes())).module()
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("fmt", ["torchscript", "pickle", pytest.param("pt2", marks=needs_native)])
def test_an_artifact_written_under_each_supported_torch_loads_and_computes_the_same_here(release, fmt):
    path, expected = _across(release, fmt)
    model = _loaded(path, fmt)
    with torch.no_grad():
        output = model(expected["input"])
    # The default kernel is bit-identical to eager on the CPU it runs on; across CPUs and releases oneDNN may give
    # other last bits
    eager = _eager_here(_pickled_forecaster(release), expected["input"])
    torch.testing.assert_close(output, eager, atol=0, rtol=0)
    torch.testing.assert_close(output, expected["output"], atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("release", RELEASES)
def test_an_aoti_package_written_under_each_supported_torch_loads_and_runs_lstmopts_op_here(release):
    # torch promises nothing for AOTInductor packages across releases; this is what holds for the supported ones.
    # The packages were compiled on an AVX2 machine (tools/compat_artifacts.py), which every CI machine can run.
    path = DATA / f"forecaster-torch{release}.aoti.pt2"
    expected = torch.load(DATA / f"forecaster-torch{release}.expected.pt", weights_only=True)
    with zipfile.ZipFile(path) as archive:
        wrappers = [archive.read(n) for n in archive.namelist() if n.endswith(".wrapper.json")]
    assert wrappers and all(b"lstmopt::onednn_lstm_dense" in w for w in wrappers)  # the LSTMs call lstmopt's op
    with torch.no_grad():
        output = torch._inductor.aoti_load_package(str(path))(expected["input"])
        eager = _eager_here(_pickled_forecaster(release), expected["input"])
    # Inductor compiles the layers around the LSTMs: close to eager, not bit-identical
    torch.testing.assert_close(output, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, expected["output"], atol=1e-5, rtol=1e-5)
