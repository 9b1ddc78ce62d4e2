"""lstmopt: run saved PyTorch models' LSTM layers on weights packed once for oneDNN."""

import importlib.abc
import importlib.util
import sys
from importlib import import_module

__version__ = "0.1.0"

# torch takes seconds to import; load the API on first use so `lstmopt --help` stays fast.
_EXPORTS = {
    "PackedLSTM": "lstmopt.modules.lstm",
    "PackedLSTMCell": "lstmopt.modules.cell",
    "PackedGRUCell": "lstmopt.modules.cell",
    "PackedGRU": "lstmopt.modules.gru",
    "PackedRNN": "lstmopt.modules.rnn",
    "packing_obstacle": "lstmopt.modules.packs",
    "Decision": "lstmopt.rewrite.swap",
    "optimize": "lstmopt.rewrite.swap",
    "plan": "lstmopt.rewrite.swap",
    "autotune": "lstmopt.rewrite.autotune",
    "LstmoptError": "lstmopt.errors",
    "UnsupportedError": "lstmopt.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lstmopt' has no attribute {name!r}")


def _register_ops() -> None:
    """Register lstmopt's ops with torch from the installed library, as ``torch.export.load`` of a program
    that calls them needs (the deployment line is ``import lstmopt``). Never builds anything, never fails
    an import: where the library cannot load, lstmopt says so when it is used."""
    import os

    if os.environ.get("LSTMOPT_NATIVE_FROM_SOURCE") or os.environ.get("LSTMOPT_NO_NATIVE"):
        return  # a build from source is lstmopt's to start where it needs the kernel, not an import's
    try:
        native = import_module("lstmopt.kernels.native")  # a layer above this package's own, as _EXPORTS are
        if native.INSTALLED_LOADER.exists():
            native.load(quiet=True)
    except Exception:  # noqa: BLE001 - a broken install is reported where the kernel is used, not here
        pass


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Runs ``_register_ops`` once torch has been imported, where lstmopt was imported first."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_ops()

            spec.loader.exec_module = exec_then_register
        return spec


if "torch" in sys.modules:
    _register_ops()
elif not any(isinstance(finder, _AfterTorchImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTorchImport())
