"""Vocabularies shared by the Python API, the CLI and batch configs (kept free of torch imports)."""

FORMATS = ("torchscript", "pickle", "pt2", "aoti")
"""Artifact formats: TorchScript (loads without lstmopt) or a pickled module (needs lstmopt to load)."""

DTYPES = ("float32", "bfloat16", "int8")
"""LSTM compute dtypes: float32 is bit-identical to eager; bfloat16 and int8 (weights, on the native kernel)
change numerics."""
