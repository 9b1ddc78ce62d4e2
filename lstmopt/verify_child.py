"""The fresh-process half of verification: load an artifact, run the given inputs, save the outputs.

``lstmopt.verification`` runs this file by path in a new interpreter. For a TorchScript artifact it first
makes ``lstmopt`` unimportable, which proves the archive loads where lstmopt is not installed. Only
torch and the standard library are used here.

    python verify_child.py ARTIFACT FORMAT PAYLOAD RESULT
"""

import sys
import traceback


def flatten(obj):
    """The tensors of a (possibly nested) model output, in a fixed order, with a name for each."""
    import torch

    found = []

    def walk(value, name):
        if isinstance(value, torch.Tensor):
            found.append((name, value))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, f"{name}[{i}]")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key], f"{name}[{key!r}]")

    walk(obj, "output")
    return found


def _submodule(model, name):
    for part in filter(None, name.split(".")):
        model = getattr(model, part)
    return model


def _error(exc):
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


def main(artifact, fmt, payload_path, result_path):
    if fmt == "torchscript":
        sys.modules["lstmopt"] = None  # the archive must not need lstmopt
    import torch

    if fmt == "torchscript":
        model = torch.jit.load(artifact, map_location="cpu")
    else:
        model = torch.load(artifact, map_location="cpu", weights_only=False)
    payload = torch.load(payload_path, weights_only=True)
    result = {"samples": [], "lstms": []}
    with torch.no_grad():
        for args in payload["samples"]:
            try:
                result["samples"].append([t for _, t in flatten(model(*args))])
            except Exception as exc:  # report it: the parent decides what it means
                result["samples"].append(_error(exc))
        for name, args in payload["lstms"]:
            try:
                lstm = _submodule(model, name)
                # A scripted LSTM's forward is overloaded; forward__0 is its (Tensor, hx) overload.
                call = lstm.forward__0 if fmt == "torchscript" else lstm
                result["lstms"].append([t for _, t in flatten(call(*args))])
            except Exception as exc:
                result["lstms"].append(_error(exc))
    torch.save(result, result_path)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
