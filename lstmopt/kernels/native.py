"""lstmopt's native LSTM kernel (``csrc/lstm.cpp``): installed with lstmopt, optional.

The kernel runs a whole LSTM call (every layer, direction and step) in one native call, for tensors and
PackedSequences: at one step or a short chunk, where per-call costs are the latency, it is several times
faster than the oneDNN op. Its results are not bit-identical (kernels/accuracy.py), so it is only
chosen where approximate kernels are allowed (``autotune(..., exact=False)``, ``--autotune --approx``).

Installing lstmopt compiles it for every instruction-set variant (``lstmopt.kernels.compile``); ``load()``
loads ``lib/liblstmopt.so``, which picks the variant for this CPU, and the Python module ``_packs``.
Run from a source tree that was never installed (or with ``LSTMOPT_NATIVE_FROM_SOURCE=1``), ``load()``
compiles the ``native`` variant for this CPU the first time, into a private cache keyed by the sources,
the CPU, torch and Python; a cached library is loaded only if it is the file lstmopt compiled
(``lstmopt.kernels.build_cache``). Where neither is possible, it says so once, in one line, and lstmopt keeps
to its other kernels. A TorchScript artifact whose LSTMs use this kernel needs the ops registered before
``torch.jit.load``: ``LOAD_LINE``, or without lstmopt ``torch.ops.load_library(library_path())``.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on NativePacks.
import ctypes
import hashlib
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lstmopt.environment import cache_root, cpuinfo
from lstmopt.kernels import compile as native_build
from lstmopt.kernels.tensor_versions import sources_of, unchanged_since

__all__ = ["LOAD_LINE", "NativePacks", "available", "library_path", "load", "module", "run_native", "run_native_cell",
           "run_native_gru_cell", "run_native_gru", "run_native_rnn", "unavailable_reason", "variant"]

LOAD_LINE = "import lstmopt.native; lstmopt.native.load()"
INSTALLED_LOADER = Path(__file__).parent / "lib" / native_build.LOADER_NAME

_lock = threading.Lock()
_state: dict = {}  # "module", "library" and "variant" once loaded, "error" once it failed


def _cpu_flags() -> str:
    return cpuinfo("flags") or platform.processor()


def _build_name(kind: str) -> str:
    """A first-use build serves only where the sources, the CPU, torch and Python are the same."""
    sources = [*native_build.OPS_SOURCES, *sorted(native_build.CSRC.glob("*.h")), native_build.PACKS]
    key = "|".join([*(path.read_text() for path in sources), " ".join(native_build.OPTIMIZE),
                    " ".join(native_build.NATIVE), _cpu_flags(), torch.__version__, sys.version])
    return f"lstmopt_{kind}_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """The directory of this machine's first-use build of the ops library."""
    return cache_root() / _build_name("ops")


def module():
    """The loaded Python module (``Packs``), or None where ``load()`` has not succeeded."""
    return _state.get("module")


def library_path() -> Optional[str]:
    """The library that registers the ops (``torch.ops.load_library`` of it serves where lstmopt is not
    installed; a C++ process ``dlopen``s it), or None where ``load()`` has not succeeded."""
    return _state.get("library")


def variant() -> Optional[str]:
    """Which build of the kernel runs: ``avx512``, ``avx2`` or ``baseline`` (installed), ``native``
    (first-use build), or None where ``load()`` has not succeeded."""
    return _state.get("variant")


def unavailable_reason() -> Optional[str]:
    """Why ``load()`` failed in this process, or None."""
    return _state.get("error")


def load(*, quiet: bool = False) -> bool:
    """Load the native kernel (building it the first time where lstmopt was not installed); False, after
    a one-line notice on stderr (unless ``quiet``), where that is impossible.

    Example:
        >>> import lstmopt.native; lstmopt.native.load()  # before torch.jit.load of a native-kernel artifact
        True
    """
    with _lock:
        if "module" in _state:
            return True
        if "error" in _state:
            _tell(quiet)
            return False
        if os.environ.get("LSTMOPT_NO_NATIVE"):
            _state["error"] = "LSTMOPT_NO_NATIVE is set"
            return False
        try:
            if not native_build.X86_64:
                raise RuntimeError(f"it is for x86-64 CPUs; this one is {platform.machine()}")
            installed = INSTALLED_LOADER.exists() and not os.environ.get("LSTMOPT_NATIVE_FROM_SOURCE")
            library, loaded = _load_installed() if installed else _load_or_build_from_source()
            _register_fake()
            _state.update(library=str(library), variant=torch.ops.lstmopt.variant(), module=loaded)
        except Exception as exc:  # no compiler, a failed build, no variant for this CPU: lstmopt works without
            _state["error"] = _first_error(str(exc))
            _tell(quiet)
            return False
    if _state["variant"] == "baseline" and not os.environ.get("LSTMOPT_NATIVE_VARIANT") and not quiet:
        print("lstmopt: this CPU has no AVX2, so the native kernel runs its baseline (SSE2) build, "
              "several times slower", file=sys.stderr)
    return True


def _tell(quiet: bool) -> None:
    """Say once, at the first load that is not quiet, why the kernel is unavailable (``import lstmopt`` tries
    quietly: the user hears of it where lstmopt is used)."""
    if not quiet and not _state.get("told"):
        _state["told"] = True
        print(f"lstmopt: native kernel unavailable ({_state['error']}); using the other kernels", file=sys.stderr)


def _first_error(text: str) -> str:
    """The line of a failed build that says what went wrong (a compiler's first error), else the start."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("[")]
    return " ".join((errors[1] if len(errors) > 1 and errors[0].startswith("Error building") else
                     (errors or lines or ["unknown error"])[0]).split())[:300]


def available() -> bool:
    """Whether the native kernel can run here (builds it the first time, quietly)."""
    return load(quiet=True)


def _load_installed():
    """The library installed with lstmopt: its loader picks this CPU's variant (csrc/loader.cpp)."""
    check_installation(INSTALLED_LOADER.parent)
    quiet = os.environ.get("LSTMOPT_LOADER_QUIET")
    os.environ["LSTMOPT_LOADER_QUIET"] = "1"  # the loader's own line is for C++ processes; this one says why
    try:
        loader = ctypes.CDLL(str(INSTALLED_LOADER))
    finally:
        if quiet is None:
            del os.environ["LSTMOPT_LOADER_QUIET"]
    loader.lstmopt_variant.restype = loader.lstmopt_error.restype = ctypes.c_char_p
    if not loader.lstmopt_variant():
        raise RuntimeError(loader.lstmopt_error().decode())
    torch.ops.load_library(str(INSTALLED_LOADER))  # the same handle: recorded in torch.ops.loaded_libraries
    from lstmopt.kernels import _packs

    return INSTALLED_LOADER, _packs


REBUILD = "rebuild it: pip install --no-deps --no-build-isolation --force-reinstall <the lstmopt source you installed>"


def check_installation(lib_dir: Path) -> None:
    """Refuse (``RuntimeError``, one line) an installed library that was built for another torch, or whose files
    are not the ones built (truncated by a full disk, a bad copy into an image): loading either would be
    undefined behaviour, a crash at best. ``lib/manifest.json`` records both when lstmopt is installed."""
    import json

    manifest_path = lib_dir / native_build.MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded, files = manifest["torch"], dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RuntimeError(f"the installed library has no readable {native_build.MANIFEST_NAME} (damaged, or from "
                           f"an older lstmopt); {REBUILD}") from None
    if recorded != torch.__version__:
        raise RuntimeError(f"the installed library was built for torch {recorded} and this is torch "
                           f"{torch.__version__}; {REBUILD}")
    for name, digest in files.items():
        try:
            actual = hashlib.sha256((lib_dir / name).read_bytes()).hexdigest()
        except OSError:
            actual = None
        if actual != digest:
            raise RuntimeError(f"the installed {Path(name).name} is damaged or missing (it is not the file built); "
                               f"{REBUILD}")


def _load_or_build_from_source():
    """The first-use build for this CPU, in the cache (``-march=native``)."""
    from lstmopt.kernels.build_cache import trusted_library

    root = cache_root()
    info = native_build.torch_build_info()
    ops_name, packs_name = _build_name("ops"), _build_name("packs")
    ops = trusted_library(root, ops_name, lambda path: _compile(
        native_build.ops_command(info, path, "native", native_build.NATIVE)))
    packs = trusted_library(root, packs_name, lambda path: _compile(
        native_build.packs_command(info, path, packs_name)))
    torch.ops.load_library(str(ops))
    spec = importlib.util.spec_from_file_location(packs_name, packs)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return ops, loaded


def _compile(command: List[str]) -> None:
    native_build.require_compiler()
    print("lstmopt: building the native kernel for this CPU (once, about 30 s)", file=sys.stderr)
    native_build.run_all([command])


def _register_fake() -> None:
    """Shapes for torch.compile and torch.export, which trace with fake tensors (the dense ops that programs
    call have theirs in the library itself, csrc/dense.cpp)."""

    @torch.library.register_fake("lstmopt::lstm")
    def _(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first):
        return _fake_lstmp(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first,
                           [], 0)

    @torch.library.register_fake("lstmopt::gru")
    def _(input, batch_sizes, hx, weights, biases, hidden_size, bidirectional, batch_first):
        output, h_n, _ = _fake_lstmp(input, batch_sizes, hx, None, weights, biases, hidden_size, bidirectional,
                                     batch_first, [], 0)
        return output, h_n

    @torch.library.register_fake("lstmopt::rnn")
    def _(input, batch_sizes, hx, weights, biases, hidden_size, bidirectional, batch_first, nonlinearity):
        output, h_n, _ = _fake_lstmp(input, batch_sizes, hx, None, weights, biases, hidden_size, bidirectional,
                                     batch_first, [], 0)
        return output, h_n

    @torch.library.register_fake("lstmopt::lstmp")
    def _fake_lstmp(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first, projections,
                    proj_size):
        units = proj_size or hidden_size  # of the hidden state and the output; the cell state has hidden_size
        width = (2 if bidirectional else 1) * units
        states = len(biases)
        if batch_sizes is not None:  # a PackedSequence's rows (N, I)
            batch = hx.size(1) if hx is not None else torch.library.get_ctx().new_dynamic_size()
            return (input.new_empty(input.size(0), width), input.new_empty(states, batch, units),
                    input.new_empty(states, batch, hidden_size))
        if input.dim() == 2:  # unbatched (T, I)
            return (input.new_empty(input.size(0), width), input.new_empty(states, units),
                    input.new_empty(states, hidden_size))
        steps, batch = (input.size(1), input.size(0)) if batch_first else (input.size(0), input.size(1))
        output = input.new_empty(steps, batch, width)  # computed time-major; batch_first gets a transposed view
        output = output.transpose(0, 1) if batch_first else output
        return output, input.new_empty(states, batch, units), input.new_empty(states, batch, hidden_size)


class NativePacks:
    """One LSTM's (or, by ``cell``, one GRU's or RNN's: ``pack_gru``, ``pack_rnn``) weights in the native
    kernel's layout (``torch.ops.lstmopt.pack``, see csrc/lstm.cpp), per layer and direction: the input then the
    recurrent weights in blocks of 16 hidden units (an RNN's: 64), the summed biases and, for ``proj_size > 0``,
    the projections (``pack_projections``).

    A TorchScript class (compiled when a scripted module holds one). Like ``LayerPacks`` it stores the
    dense weights it came from, not the laid-out copy, and lays them out again when loaded: the layout
    follows the vector width of the machine's build. ``sources``: data pointer and version of each dense
    tensor when packed. ``weights_format``: ``"float32"``, ``"bfloat16"`` (the weights rounded to bf16,
    widened on load) or ``"int8"`` (an LSTM without a projection): int8 weights with a scale per gate row
    (``optimize(dtype=...)``, csrc/lstm.cpp's "int8 weights").
    """

    def __init__(self, dense: List[Tensor], hidden_size: int, num_layers: int, bidirectional: bool,
                 has_biases: bool, proj_size: int = 0, cell: str = "lstm", weights_format: str = "float32"):
        self.dense = dense
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.has_biases = has_biases
        self.proj_size = proj_size
        self.cell = cell  # "lstm", "gru", "rnn_tanh" or "rnn_relu": what the layers compute after the gates
        self.weights_format = weights_format
        weights, biases = _pack(dense, hidden_size, has_biases, proj_size, cell, weights_format)
        self.weights = weights
        self.biases = biases
        self.projections = _pack_projections(dense, hidden_size, has_biases, proj_size)
        self.sources = sources_of(dense)

    def is_current(self, dense: List[Tensor]) -> bool:
        """Whether these packs were made from these very tensors, unchanged since (in TorchScript, which
        cannot read data pointers, only in-place changes are seen)."""
        return unchanged_since(self.sources, dense)

    # By position: TorchScript classes pickle tuples. An archive holds its own copy of this class's code, so
    # the layout may change between releases (it was a bool ``gru`` where ``cell`` is now).
    def __getstate__(self) -> Tuple[List[Tensor], int, int, bool, bool, int, str, str]:
        return (self.dense, self.hidden_size, self.num_layers, self.bidirectional, self.has_biases, self.proj_size,
                self.cell, self.weights_format)

    def __setstate__(self, state: Tuple[List[Tensor], int, int, bool, bool, int, str, str]) -> None:
        weights, biases = _pack(state[0], state[1], state[4], state[5], state[6], state[7])
        self.dense = state[0]
        self.hidden_size = state[1]
        self.num_layers = state[2]
        self.bidirectional = state[3]
        self.has_biases = state[4]
        self.proj_size = state[5]
        self.cell = state[6]
        self.weights_format = state[7]
        self.weights = weights
        self.biases = biases
        self.projections = _pack_projections(state[0], state[1], state[4], state[5])
        self.sources = sources_of(state[0])


def _pack(dense: List[Tensor], hidden_size: int, has_biases: bool, proj_size: int, cell: str, weights_format: str
          ) -> Tuple[List[Tensor], List[Tensor]]:
    if cell == "gru":
        return torch.ops.lstmopt.pack_gru(dense, hidden_size, has_biases)
    if cell != "lstm":
        return torch.ops.lstmopt.pack_rnn(dense, hidden_size, has_biases)
    if weights_format != "float32":  # a float32 call stays the one archives made before int8 existed
        return torch.ops.lstmopt.pack(dense, hidden_size, has_biases, proj_size, weights_format)
    return torch.ops.lstmopt.pack(dense, hidden_size, has_biases, proj_size)


def _pack_projections(dense: List[Tensor], hidden_size: int, has_biases: bool, proj_size: int) -> List[Tensor]:
    if proj_size == 0:
        return []
    return torch.ops.lstmopt.pack_projections(dense, hidden_size, has_biases, proj_size)


def run_native(packs: NativePacks, input: Tensor, batch_sizes: Optional[Tensor], hx: Optional[Tuple[Tensor, Tensor]],
               batch_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The kernel through the dispatcher, for TorchScript (the Python path calls the module's ``Packs``
    directly, which skips the dispatcher's microseconds). Arguments as ``Packs.forward`` takes them."""
    h0: Optional[Tensor] = None
    c0: Optional[Tensor] = None
    if hx is not None:
        h0, c0 = hx[0], hx[1]
    if packs.proj_size > 0:
        return torch.ops.lstmopt.lstmp(input, batch_sizes, h0, c0, packs.weights, packs.biases, packs.hidden_size,
                                       packs.bidirectional, batch_first, packs.projections, packs.proj_size)
    return torch.ops.lstmopt.lstm(input, batch_sizes, h0, c0, packs.weights, packs.biases, packs.hidden_size,
                                  packs.bidirectional, batch_first)


def run_native_gru(packs: NativePacks, input: Tensor, batch_sizes: Optional[Tensor], hx: Optional[Tensor],
                   batch_first: bool) -> Tuple[Tensor, Tensor]:
    """An nn.GRU call (packs with ``gru``) through the dispatcher, for TorchScript: (output, h_n)."""
    return torch.ops.lstmopt.gru(input, batch_sizes, hx, packs.weights, packs.biases, packs.hidden_size,
                                 packs.bidirectional, batch_first)


def run_native_rnn(packs: NativePacks, input: Tensor, batch_sizes: Optional[Tensor], hx: Optional[Tensor],
                   batch_first: bool) -> Tuple[Tensor, Tensor]:
    """An nn.RNN call (packs with cell ``rnn_tanh`` or ``rnn_relu``) through the dispatcher, for TorchScript."""
    nonlinearity = "relu" if packs.cell == "rnn_relu" else "tanh"
    return torch.ops.lstmopt.rnn(input, batch_sizes, hx, packs.weights, packs.biases, packs.hidden_size,
                                 packs.bidirectional, batch_first, nonlinearity)


def run_native_cell(packs: NativePacks, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """One nn.LSTMCell step (packs of one layer) through the dispatcher, for TorchScript (the Python path
    calls ``Packs.try_cell``): input (B, I) or (I,), states to match; returns (h', c') shaped as the states."""
    batch = input.size(0) if input.dim() == 2 else 1
    hidden = packs.hidden_size
    h0: Optional[Tensor] = None
    c0: Optional[Tensor] = None
    if hx is not None:
        h0, c0 = hx[0].reshape(1, batch, hidden), hx[1].reshape(1, batch, hidden)
    _, h_n, c_n = torch.ops.lstmopt.lstm(input.reshape(1, batch, input.size(-1)), None, h0, c0, packs.weights,
                                         packs.biases, hidden, False, False)
    if input.dim() == 1:
        return h_n.reshape(hidden), c_n.reshape(hidden)
    return h_n.reshape(batch, hidden), c_n.reshape(batch, hidden)


def run_native_gru_cell(packs: NativePacks, input: Tensor, hx: Optional[Tensor]) -> Tensor:
    """One nn.GRUCell step (packs of one GRU layer) through the dispatcher, for TorchScript (the Python path
    calls ``Packs.try_cell``): input (B, I) or (I,), hx to match; returns h' shaped as hx."""
    batch = input.size(0) if input.dim() == 2 else 1
    hidden = packs.hidden_size
    h0: Optional[Tensor] = None
    if hx is not None:
        h0 = hx.reshape(1, batch, hidden)
    _, h_n = torch.ops.lstmopt.gru(input.reshape(1, batch, input.size(-1)), None, h0, packs.weights, packs.biases,
                                   hidden, False, False)
    if input.dim() == 1:
        return h_n.reshape(hidden)
    return h_n.reshape(batch, hidden)
