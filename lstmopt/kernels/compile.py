"""How lstmopt's native library is compiled: the files, the instruction-set variants and their flags.

One description serves both builds: ``setup.py`` compiles every variant when lstmopt is installed (a
wheel then runs on any x86-64 CPU, with no compiler there), and ``lstmopt.kernels.native`` compiles the
``native`` variant for this CPU on first use when lstmopt runs from a source tree that was never
installed. This module imports nothing of lstmopt's or torch's at import time: setup.py loads it by path,
in a build environment where neither is importable.

What an installation holds, in ``lstmopt/kernels/lib/``:

- ``lstmopt_ops_<variant>.so``: ``csrc/lstm.cpp``, ``csrc/pack.cpp`` and ``csrc/dense.cpp`` (with their headers) built for one instruction-set level; it registers the
  ``torch.ops.lstmopt.*`` ops (``TORCH_LIBRARY``) and links libtorch only, no Python;
- ``liblstmopt.so``: ``csrc/loader.cpp``, which picks the variant for the CPU it runs on and loads it;
- ``_packs`` (a Python extension module, beside this file): ``csrc/packs.cpp``, Python's fast way in;
- ``manifest.json``: the torch release they were built against and the SHA-256 of each of them, which
  ``lstmopt.kernels.native`` checks before loading any (a library built for another torch, or truncated by a
  full disk, would crash the process instead of failing to load).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

CSRC = Path(__file__).parent / "csrc"
KERNEL, PACKS, LOADER = CSRC / "lstm.cpp", CSRC / "packs.cpp", CSRC / "loader.cpp"
OPS_SOURCES = [KERNEL, CSRC / "pack.cpp", CSRC / "dense.cpp"]  # with csrc/*.h: the ops library
LOADER_NAME = "liblstmopt.so"
MANIFEST_NAME = "manifest.json"
OPTIMIZE = ["-O3", "-ffp-contract=fast", "-fopenmp"]

# The torch releases lstmopt supports: the current one and the one before (pyproject.toml's range says the same
# to pip). Its private ops are checked against each by the suite; setup.py refuses to build against another.
SUPPORTED_TORCH = ("2.13", "2.14")

# Fastest first, as loader.cpp tries them. Each names the instructions it may use: loader.cpp checks
# the same ones before loading it. -mtune stays generic: the code is vectorized by hand.
VARIANTS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "baseline": ["-march=x86-64"],
}
NATIVE = ["-march=native"]  # the first-use build, for this CPU only
# The kernel is written with x86 intrinsics: elsewhere lstmopt installs and runs without it.
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def ops_name(variant: str) -> str:
    return f"lstmopt_ops_{variant}.so"


def torch_build_info() -> dict:
    """What compiling against the installed torch needs: its include and library paths, its C++ ABI, and
    Python's headers.

    pip builds a package in an isolated environment that must not install torch (it would fetch
    another, multi-GB build): where torch is not importable here, it is read from the environment this
    interpreter belongs to (``python -I`` leaves out the isolation's paths), where the user installed it."""
    try:
        return _probe()
    except ImportError:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        proc = subprocess.run([sys.executable, "-I", __file__], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError("lstmopt builds its native library against the installed torch, and this environment "
                               f"has none: install torch {' or '.join(SUPPORTED_TORCH)} first "
                               f"(pip install torch=={SUPPORTED_TORCH[-1]}.*)") from None
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe() -> dict:
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    return {"includes": cpp_extension.include_paths(), "libraries": cpp_extension.library_paths(),
            "abi": int(torch._C._GLIBCXX_USE_CXX11_ABI), "version": torch.__version__,
            "python_include": sysconfig.get_path("include", scheme="posix_prefix")}


def check_supported_torch(version: str) -> None:
    """Stop an installation against an unsupported torch before pip replaces it (``SystemExit``, one line)."""
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release not in SUPPORTED_TORCH:
        newest = SUPPORTED_TORCH[-1]
        raise SystemExit(f"lstmopt supports torch {' and '.join(SUPPORTED_TORCH)} (the current release and the one "
                         f"before); this environment has torch {version}. Install a supported torch first, e.g. "
                         f"`pip install torch=={newest}.*`, then lstmopt: pip never replaces your torch for it")


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def _torch_flags(info: dict, *, python: bool) -> list[str]:
    includes = [*info["includes"], *([info["python_include"]] if python else [])]
    # The torch directory beside an installed lstmopt, then the one built against (an editable install).
    rpaths = ["$ORIGIN/../../../torch/lib", "$ORIGIN/../../torch/lib", *info["libraries"]]
    return [f"-D_GLIBCXX_USE_CXX11_ABI={info['abi']}", *[f"-isystem{p}" for p in includes],
            *[f"-L{p}" for p in info["libraries"]], *[f"-Wl,-rpath,{p}" for p in rpaths]]


def ops_command(info: dict, output: Path, variant: str, isa: Sequence[str]) -> list[str]:
    """``lstm.cpp`` as one variant's ops library: libtorch only, no Python."""
    return [compiler(), "-shared", "-fPIC", "-std=c++20", *OPTIMIZE, *isa, f'-DLSTMOPT_VARIANT="{variant}"',
            *map(str, OPS_SOURCES), "-o", str(output), *_torch_flags(info, python=False), "-lc10", "-ltorch_cpu"]


def packs_command(info: dict, output: Path, module_name: str) -> list[str]:
    """``packs.cpp`` as the Python extension module ``module_name``; it runs no kernel, so -O2 for any CPU."""
    return [compiler(), "-shared", "-fPIC", "-std=c++20", "-O2", f"-DTORCH_EXTENSION_NAME={module_name}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", str(PACKS), "-o", str(output), *_torch_flags(info, python=True),
            "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]


def loader_command(output: Path) -> list[str]:
    return [compiler(), "-shared", "-fPIC", "-std=c++20", "-O2", str(LOADER), "-o", str(output), "-ldl"]


def require_compiler() -> None:
    if shutil.which(compiler()) is None:
        raise RuntimeError(f"no C++ compiler ({compiler()}) found")


def run_all(commands: Sequence[Sequence[str]]) -> None:
    """Run compilations side by side (a variant takes about 30 s); the first failure's error is raised."""
    require_compiler()
    procs = [subprocess.Popen(list(c), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    failures = []
    for command, proc in zip(commands, procs):
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{Path(command[command.index('-o') - 1]).name}: {output}")
    if failures:
        raise RuntimeError("Error building the native kernel:\n" + "\n".join(failures))


def library_files() -> list[str]:
    """The files of ``lib/`` in an installation."""
    return [*map(ops_name, VARIANTS), LOADER_NAME, MANIFEST_NAME]


def build_installed(lib_dir: Path, packs_output: Path) -> None:
    """Everything an installation holds (see the module docstring), for every variant."""
    if not X86_64:
        raise RuntimeError(f"lstmopt's native kernel is for x86-64 CPUs; this one is {platform.machine()}")
    info = torch_build_info()
    lib_dir.mkdir(parents=True, exist_ok=True)
    commands = [ops_command(info, lib_dir / ops_name(v), v, isa) for v, isa in VARIANTS.items()]
    commands += [packs_command(info, packs_output, "_packs"), loader_command(lib_dir / LOADER_NAME)]
    run_all(commands)
    write_manifest(lib_dir, info["version"], [*(lib_dir / name for name in library_files()
                                                if name != MANIFEST_NAME), packs_output])


def write_manifest(lib_dir: Path, torch_version: str, files: Sequence[Path]) -> None:
    """Record the torch release and each built file's SHA-256 (named relative to ``lib_dir``)."""
    import hashlib

    digests = {os.path.relpath(path, lib_dir): hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in files}
    (lib_dir / MANIFEST_NAME).write_text(json.dumps({"torch": torch_version, "files": digests}, indent=1) + "\n")


if __name__ == "__main__":  # torch_build_info's probe, run in the interpreter's own environment
    print(json.dumps(_probe()))
