"""lstmopt: run saved PyTorch models' LSTM layers on weights packed once for oneDNN."""

from importlib import import_module

__version__ = "0.1.0"

# torch takes seconds to import; load the API on first use so `lstmopt --help` stays fast.
_EXPORTS = {
    "PackedLSTM": "lstmopt.modules.lstm",
    "PackedLSTMCell": "lstmopt.modules.cell",
    "PackedGRUCell": "lstmopt.modules.cell",
    "PackedGRU": "lstmopt.modules.gru",
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
