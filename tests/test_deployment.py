"""Where artifacts run: a wheel installed on a machine with no compiler, and a C++ libtorch process.

These are the README's deployment section, run: each builds what a user would (a wheel, a C++ program)
and runs a native-kernel artifact in it, against the results of Python with lstmopt."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from conftest import ROOT, needs_compiler, needs_native, run_python
from lstmopt import native, optimize
from lstmopt.artifacts.writing import write_artifact
from models import build_forecaster


def _native_artifact(tmp_path: Path, fmt: str = "torchscript"):
    """A forecaster whose decoder runs the native kernel, an input, and nn.LSTM's output for it."""
    torch.manual_seed(0)
    model = build_forecaster().eval()
    fast = optimize(model)
    fast.decoder.use_kernel("native")
    artifact = write_artifact(fast, tmp_path / f"forecaster.{fmt}.pt", format=fmt, metadata={})
    x = torch.randn(3, 7, 3)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        return artifact, x, model(x)


def _python_result(artifact: Path, x_path: Path, out_path: Path) -> torch.Tensor:
    """The artifact run by Python with torch alone and the ops library, as a deployment would."""
    proc = run_python(f"""
        import sys
        sys.modules["lstmopt"] = None
        import torch
        torch.ops.load_library({native.library_path()!r})
        model = torch.jit.load({str(artifact)!r})
        with torch.inference_mode():
            torch.save(model(torch.load({str(x_path)!r})), {str(out_path)!r})
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(out_path)


@needs_native
@needs_compiler
def test_a_cpp_libtorch_process_runs_a_native_kernel_artifact_with_pythons_exact_results(tmp_path):
    client = tmp_path / "run_artifact"
    torch_lib = cpp_extension.library_paths()[0]
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++20", "-O1", str(ROOT / "tests/cpp/run_artifact.cpp"),
                    "-o", str(client), *[f"-isystem{p}" for p in cpp_extension.include_paths()],
                    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-L{torch_lib}",
                    f"-Wl,-rpath,{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"], check=True)
    artifact, x, expected = _native_artifact(tmp_path)
    proc = subprocess.run([str(client), native.library_path(), str(artifact), str(tmp_path / "x.pt"),
                           str(tmp_path / "cpp.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_cpp = torch.load(tmp_path / "cpp.pt")
    assert torch.equal(from_cpp, _python_result(artifact, tmp_path / "x.pt", tmp_path / "python.pt"))
    torch.testing.assert_close(from_cpp, expected, atol=1e-6, rtol=1e-6)
    # Without the library the process says which op is missing, and lives to say it.
    proc = subprocess.run([str(client), "/nonexistent/liblstmopt.so", str(artifact), str(tmp_path / "x.pt"),
                           str(tmp_path / "none.pt")], capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot load /nonexistent/liblstmopt.so" in proc.stderr


@needs_native
@needs_compiler
def test_a_wheel_built_here_runs_native_kernel_artifacts_where_there_is_no_compiler(tmp_path):
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    # As a user builds it: pip's own isolated build environment, which must find the installed torch.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True)
    (wheel,) = dist.glob("lstmopt-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    shutil.rmtree(dist)  # nothing of the build is left to be found

    artifacts = {fmt: _native_artifact(tmp_path, fmt) for fmt in ("torchscript", "pickle")}
    cache = tmp_path / "empty-cache"
    cache.mkdir(mode=0o700)
    check = f"""
import json, sys, torch
from lstmopt import native
assert native.load(), native.unavailable_reason()
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    scripted = torch.jit.load({str(artifacts['torchscript'][0])!r})(x)
    pickled = torch.load({str(artifacts['pickle'][0])!r}, weights_only=False)(x)
torch.save([scripted, pickled], {str(tmp_path / 'outputs.pt')!r})
print(json.dumps({{"variant": native.variant(), "library": native.library_path()}}))
"""
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "LSTMOPT_CACHE": str(cache)}
    proc = subprocess.run([str(venv / "bin/python"), "-c", check], capture_output=True, text=True, env=env,
                          cwd=ROOT / "tests")  # the pickle's classes are in tests/models.py
    assert shutil.which("c++", path=env["PATH"]) is None and shutil.which("g++", path=env["PATH"]) is None
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building" not in proc.stderr and not any(cache.iterdir())  # nothing was compiled
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["library"].startswith(str(venv)) and loaded["variant"] == native.variant()
    for output in torch.load(tmp_path / "outputs.pt"):
        torch.testing.assert_close(output, artifacts["torchscript"][2], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """One native-kernel forecaster in every format, an input, and the optimized model's output for it."""
    tmp_path = tmp_path_factory.mktemp("deployed")
    torch.manual_seed(0)
    fast = optimize(build_forecaster().eval())
    fast.decoder.use_kernel("native")
    x = torch.randn(3, 7, 3)
    torch.save(x, tmp_path / "x.pt")
    paths = {fmt: write_artifact(fast, tmp_path / f"m.{fmt}", format=fmt, metadata={}, samples=[(x,)])
             for fmt in ("torchscript", "pickle", "pt2", "aoti")}
    with torch.no_grad():
        return paths, tmp_path / "x.pt", fast(x)


# The README's deployment table, line by line: (format, what the loading process runs first, how it loads)
LOAD_LINES = [
    ("torchscript", "import sys; sys.modules['lstmopt'] = None; import torch; torch.ops.load_library(LIB)",
     "torch.jit.load(PATH)"),
    ("pt2", "import lstmopt; import torch", "torch.export.load(PATH).module()"),
    ("pt2", "import torch; import lstmopt", "torch.export.load(PATH).module()"),
    ("pt2", "import sys; sys.modules['lstmopt'] = None; import torch; torch.ops.load_library(LIB)",
     "torch.export.load(PATH).module()"),
    ("aoti", "import lstmopt; import torch", "torch._inductor.aoti_load_package(PATH)"),
    ("aoti", "import sys; sys.modules['lstmopt'] = None; import torch; torch.ops.load_library(LIB)",
     "torch._inductor.aoti_load_package(PATH)"),
    ("pickle", "import torch", "torch.load(PATH, weights_only=False)"),
]


@needs_native
@needs_compiler
@pytest.mark.parametrize("fmt, first, load", LOAD_LINES, ids=[f"{f}: {s.split(';')[-1].strip()}" for f, s, _ in LOAD_LINES])
def test_every_load_line_of_the_deployment_table_runs_its_artifact_in_a_fresh_process(deployed, tmp_path, fmt, first,
                                                                                     load):
    paths, x_path, expected = deployed
    path = paths[fmt]
    out = tmp_path / "y.pt"
    proc = run_python(f"""
        {first.replace("LIB", repr(native.library_path()))}
        model = {load.replace("PATH", repr(str(path)))}
        with torch.inference_mode():
            torch.save(model(torch.load({str(x_path)!r})), {str(out)!r})
    """, cwd=ROOT / "tests")  # a pickle's classes are in tests/models.py
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), expected, atol=1e-6, rtol=1e-6)


def test_installing_lstmopt_beside_a_supported_torch_changes_nothing_of_torch(tmp_path):
    """pip resolves lstmopt's dependencies against the installed torch and finds nothing to do for it."""
    report = tmp_path / "install.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation", "--report",
                    str(report), str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    planned = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert "torch" not in planned and "lstmopt" in planned


@pytest.mark.parametrize("version", ["2.12.1", "2.15.0"])
def test_building_against_an_unsupported_torch_stops_before_anything_is_replaced(version):
    """setup.py, which pip runs before it resolves anything, refuses in one line naming the releases to install."""
    proc = run_python(f"""
        import runpy, sys, types
        # the torch setup.py would build against, as its probe sees it
        torch = types.ModuleType("torch")
        torch.__version__ = {version!r}
        torch._C = types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=1)
        utils, extension = types.ModuleType("torch.utils"), types.ModuleType("torch.utils.cpp_extension")
        extension.include_paths = extension.library_paths = lambda: []
        torch.utils, utils.cpp_extension = utils, extension
        sys.modules.update({{"torch": torch, "torch.utils": utils, "torch.utils.cpp_extension": extension}})
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
    """)
    assert proc.returncode == 1
    (line,) = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert line.startswith(f"lstmopt supports torch 2.13 and 2.14 (the current release and the one before); this "
                           f"environment has torch {version}")
    assert "pip install torch==2.14.*" in line
