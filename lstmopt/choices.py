"""Vocabularies shared by the Python API, the CLI and batch configs (kept free of torch imports)."""

FORMATS = ("torchscript", "pickle", "pt2", "aoti")
"""Artifact formats: TorchScript (loads without lstmopt), a pickled module (needs lstmopt and the model's
classes to load), a torch.export program (pt2), and that program compiled by AOTInductor (aoti)."""

AUTO = "auto"
AUTO_ROUTE = ("torchscript", "pt2", "pickle")
"""What ``--format auto`` (the default) tries, in order, keeping the first that verifies (lstmopt.job.route)."""

FORMAT_CHOICES = (AUTO, *FORMATS)
"""What a user may ask for."""

DTYPES = ("float32", "bfloat16", "int8")
"""LSTM compute dtypes: float32 is bit-identical to eager; bfloat16 and int8 (weights, on the native kernel)
change numerics."""


RECURRENT_CLASSES = "nn.LSTM, nn.LSTMCell, nn.GRU, nn.GRUCell or nn.RNN"
"""The torch classes lstmopt packs, in words (one handler each in lstmopt.rewrite.kinds; a test holds them equal)."""

QUANTIZED_DTYPES = ("qint8", "float16")
"""The weights of torch.ao's dynamic-quantized recurrent modules, which lstmopt reads (lstmopt.rewrite.quantized)."""


def names_a_function(text: str) -> bool:
    """Whether an option's value names a function in the user's code, ``package.module:function`` (as
    ``--factory`` and ``--example-inputs`` may), rather than a file: a file of that name wins."""
    import os
    import re

    return not os.path.exists(text) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text) is not None
