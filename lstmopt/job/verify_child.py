"""The fresh-process half of verification: load an artifact, run the given inputs, save the outputs.

``lstmopt.job.verification`` runs this file by path in a new, isolated interpreter. For a TorchScript artifact
it first makes ``lstmopt`` unimportable, which proves the archive loads where lstmopt is not installed.
Only torch and the standard library are used here.

    python -I verify_child.py ARTIFACT FORMAT PAYLOAD SAMPLES RESULT
"""

import sys
import traceback

# Settings that change CPU results in their last bits (a matmul or oneDNN split over another number of
# threads sums in another order): the parent captures them where it computes the reference outputs and
# the child applies them before computing the artifact's, so an exact comparison compares like with like.
_FP32_PRECISIONS = ("fp32_precision", "matmul.fp32_precision", "conv.fp32_precision", "rnn.fp32_precision")


def _mkldnn_setting(path):
    import torch

    owner = torch.backends.mkldnn
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
    return owner, name


def numerics_settings():
    """This process's settings that change numerics (see above)."""
    import torch

    settings = {"threads": torch.get_num_threads(),
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "mkldnn_enabled": bool(torch.backends.mkldnn.enabled)}
    for path in _FP32_PRECISIONS:
        owner, name = _mkldnn_setting(path)
        if owner is not None and hasattr(owner, name):
            settings[f"mkldnn.{path}"] = getattr(owner, name)
    return settings


def apply_numerics_settings(settings):
    """Make this process compute as the one that captured ``settings`` does."""
    import torch

    if settings["threads"] != torch.get_num_threads():
        torch.set_num_threads(settings["threads"])
    if settings["float32_matmul_precision"] != torch.get_float32_matmul_precision():
        torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    torch.backends.mkldnn.enabled = settings["mkldnn_enabled"]
    for key, value in settings.items():
        if key.startswith("mkldnn.") and key[len("mkldnn."):] in _FP32_PRECISIONS:
            owner, name = _mkldnn_setting(key[len("mkldnn."):])
            if owner is not None and getattr(owner, name, value) != value:
                setattr(owner, name, value)


def seed_generators(seed):
    """Seed every random generator a model may draw from (torch's CPU generator, Python's, NumPy's if it is
    loaded), before each compared call when ``--seed`` is given: a model that samples or keeps dropout on
    in eval mode then draws the same numbers on both sides. None: leave them alone."""
    if seed is None:
        return
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None and hasattr(numpy, "random"):
        numpy.random.seed(seed)


def flatten(obj):
    """The tensors of a (possibly nested) model output, in a fixed order, with a name for each. A dataclass's
    fields come in their order, as those of the named tuple a TorchScript artifact returns for it
    (``lstmopt.artifacts.outputs``)."""
    import dataclasses

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
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                if field.init:
                    walk(getattr(value, field.name), f"{name}.{field.name}")

    walk(obj, "output")
    return found


def _class_name(module):
    """A module's class as ``package.module.Class``; a scripted module's as TorchScript names it, without its
    ``__torch__.`` prefix and name mangling."""
    import re

    if hasattr(module, "_c"):
        name = module._c._type().qualified_name().removeprefix("__torch__.")
        return re.sub(r"___torch_mangle_\d+\.", "", name)
    return f"{type(module).__module__}.{type(module).__qualname__}"


def inventory(model, fmt, names, artifact):
    """What the loaded artifact holds: for a module format, the class and kernels of the module found at each
    of ``names``; for a program, the lstmopt ops its graph calls, each with the module that called it."""
    if fmt in ("pt2", "aoti"):
        return {"ops": _program_ops(artifact, fmt)}
    found = {}
    for name in names:
        try:
            module = _submodule(model, name)
        except AttributeError:
            found[name] = {"class": None}
            continue
        if fmt == "torchscript":
            module = getattr(module, "scripted_lstm", module)  # below a traced nn.LSTM subclass's own forward
        found[name] = {"class": _class_name(module),
                       **{key: _attribute(module, key) for key in ("kernel", "sequence_kernel", "native_weights")},
                       # None where the module has no such attribute (written by an older lstmopt)
                       "kernel_live": (_attribute(module, "kernel_dtype") is not None
                                       if _has(module, "kernel_dtype") else None),
                       "native_packs": _has(module, "native_packs")}
    return {"modules": found}


def _attribute(module, name):
    try:
        value = getattr(module, name)
    except (AttributeError, RuntimeError):
        return None
    return value if value is None or isinstance(value, (str, bool, int, float)) else str(value)


def _has(module, name):
    if hasattr(module, "_c"):  # scripted: asked of the module itself, not by converting the value to Python
        return module._c.hasattr(name)  # (a TorchScript class's value has no Python class in a fresh process)
    try:
        return hasattr(module, name)
    except RuntimeError:
        return False


def _program_ops(artifact, fmt):
    """The lstmopt ops a program calls: (op, module path) per call for pt2 (its graph keeps each node's module
    stack); for an AOTInductor package, whose graph is compiled, the op names its files name, once per call."""
    import io
    import re
    import zipfile

    import torch

    if fmt == "pt2":
        with open(artifact, "rb") as f:
            program = torch.export.load(io.BytesIO(f.read()))
        calls = []
        for node in program.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("lstmopt."):
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                calls.append([str(node.target).split(".")[1], stack[-1][0] if stack else None])
        return calls
    calls = []
    with zipfile.ZipFile(artifact) as archive:
        for entry in archive.namelist():
            if entry.endswith((".json", ".cpp", ".wrapper.cpp")):
                text = archive.read(entry).decode("utf-8", "replace")
                calls += [[op, None] for op in re.findall(r"lstmopt::(\w+)", text)]
    return calls


def _submodule(model, name):
    for part in filter(None, name.split(".")):
        model = getattr(model, part)
    return model


def load_program(path, fmt):
    """A pt2 program (as a module) or an AOTInductor package, from a file of any name: torch wants a .pt2
    suffix on a path, not on a buffer."""
    import io

    import torch

    with open(path, "rb") as f:
        data = io.BytesIO(f.read())
    if fmt == "pt2":
        return torch.export.load(data).module()
    return torch._inductor.aoti_load_package(data)


def _error(exc):
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


def _register_pytree_types(types_):
    """Register the dataclasses a program's inputs and outputs hold, as the exporting process did: loading a
    program needs each under the name its tree spec was saved with."""
    import importlib

    import torch

    for module_name, qualname, serialized in types_:
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        try:
            torch.export.register_dataclass(cls, serialized_type_name=serialized)
        except ValueError:  # registered already (by its own package, say)
            pass


def main(artifact, fmt, payload_path, samples_path, result_path):
    if fmt in ("torchscript", "pt2", "aoti"):
        sys.modules["lstmopt"] = None  # the archive must not need lstmopt
    import torch

    payload = torch.load(payload_path, weights_only=True)
    sys.path.extend(p for p in payload["import_paths"] if p not in sys.path)  # after the installed packages
    # Inputs that hold objects of the user's classes (a dataclass batch) are unpickled with those classes; the
    # file is lstmopt's own, in its private directory.
    samples = torch.load(samples_path, weights_only=not payload["samples_hold_objects"])
    _register_pytree_types(payload["pytree_types"])
    if payload["native_library"]:  # the one thing an archive needs beyond torch (lstmopt.native.LOAD_LINE)
        torch.ops.load_library(payload["native_library"])
    if fmt == "torchscript":
        model = torch.jit.load(artifact, map_location="cpu")
    elif fmt in ("pt2", "aoti"):
        model = load_program(artifact, fmt)
    else:
        model = torch.load(artifact, map_location="cpu", weights_only=False)
    apply_numerics_settings(payload["numerics"])
    result = {"samples": [], "lstms": [], "numerics": numerics_settings(),
              "inventory": inventory(model, fmt, payload["expected_modules"], artifact)}
    with torch.no_grad():
        for args in samples:
            seed_generators(payload["seed"])
            try:
                result["samples"].append([t for _, t in flatten(model(*args))])
            except Exception as exc:  # report it: the parent decides what it means
                result["samples"].append(_error(exc))
        for name, args in payload["lstms"]:
            try:
                lstm = _submodule(model, name)
                # The LSTM itself, below the forward of an nn.LSTM subclass: traced, that forward takes only
                # what it took on the example inputs, and it calls a scripted twin (artifacts/tracing.py).
                if fmt == "torchscript":
                    lstm = getattr(lstm, "scripted_lstm", lstm)
                    # A scripted LSTM's forward is overloaded (forward__0 is its (Tensor, hx) overload),
                    # unless it was scripted for a trace, with one tensor forward.
                    call = lstm.forward__0 if hasattr(lstm, "forward__0") else lstm
                else:
                    call = getattr(lstm, "packed_forward", lstm)  # past a packed subclass's own forward
                result["lstms"].append([t for _, t in flatten(call(*args))])
            except Exception as exc:
                result["lstms"].append(_error(exc))
    torch.save(result, result_path)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:6])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
