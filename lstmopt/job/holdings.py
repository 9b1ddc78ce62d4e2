"""What an artifact holds: the optimized modules and kernels the report claims, counted in the loaded artifact.

Equal outputs do not prove an artifact is optimized: a model whose class pickles itself its own way (flair's
``LanguageModel.__setstate__`` builds a new model from its constructor arguments) loads from a pickle with
stock ``nn.LSTM``s again, and computes exactly what the original computes. So the fresh process that
verifies an artifact also reports what it loaded (``verify_child.inventory``): for TorchScript and pickle,
the class and kernels of the module at each name the plan packed; for a program (pt2, aoti), the lstmopt
ops its graph calls. ``problems`` compares that with the decisions; any difference fails verification,
with its cause where lstmopt can name it.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from lstmopt.artifacts.program import PROGRAM_OPS

__all__ = ["as_decisions", "expected_modules", "expected_ops", "problems", "runs_lstmopt_kernels"]


def as_decisions(modules: Sequence[dict]) -> list:
    """The ``modules`` of a report or an artifact's metadata as objects these functions read (``Decision``'s
    fields, with its defaults where an older lstmopt wrote fewer)."""
    from types import SimpleNamespace

    defaults = {"kind": "LSTM", "kernel": None, "sequence_kernel": None, "packed_dtype": None, "packed": False}
    return [SimpleNamespace(**{**defaults, **m}) for m in modules]


def _native_weights(decision) -> Optional[str]:
    if decision.kind != "LSTM":
        return None
    if decision.kernel == "native" and decision.packed_dtype in ("int8", "bfloat16"):
        return decision.packed_dtype
    return "float32"


def runs_lstmopt_kernels(decision) -> bool:
    """Whether a module of the decisions runs one of lstmopt's kernels for some input (not nn.LSTM's own path)."""
    return decision.packed and (decision.kernel not in (None, "stock")
                                or decision.sequence_kernel not in (None, "stock"))


def expected_modules(decisions: Sequence) -> dict:
    """Per module the decisions optimize: its kind and the kernels it must run in a module artifact."""
    return {d.name: {"kind": d.kind, "kernel": d.kernel, "sequence_kernel": d.sequence_kernel if d.kind == "LSTM" else None,
                     "native_weights": _native_weights(d)}
            for d in decisions if runs_lstmopt_kernels(d)}


def expected_ops(decisions: Sequence) -> list[tuple[str, str]]:
    """(op, module name) per lstmopt op call a program of these decisions holds."""
    return [(PROGRAM_OPS[(d.kind, d.kernel)], d.name) for d in decisions
            if d.packed and (d.kind, d.kernel) in PROGRAM_OPS and d.packed_dtype == "float32"]


def problems(expected: dict, ops: list[tuple[str, str]], inventory: dict, *, prefix: str = "",
             model: Optional[nn.Module] = None) -> list[str]:
    """Where the loaded artifact's ``inventory`` (``verify_child.inventory``) does not hold the ``expected``
    modules (module formats) or ``ops`` (programs). ``model``: the optimized model, to name a cause."""
    if "ops" in inventory:
        return _program_problems(ops, inventory["ops"])
    found = inventory.get("modules", {})
    wrong = []
    for name, want in expected.items():
        got = found.get(prefix + name) or {"class": None}
        label = name or "<model>"
        cls = got["class"]
        if cls is None:
            wrong.append(f"{label} is missing from the loaded artifact")
        elif not cls.startswith("lstmopt."):
            wrong.append(f"{label} is {cls} after loading, not lstmopt's packed {want['kind']}"
                         + _undoing_cause(model, name))
        elif got["kernel"] != want["kernel"]:
            wrong.append(f"{label} runs the {got['kernel']} kernel after loading, not {want['kernel']}")
        elif want["sequence_kernel"] is not None and got["sequence_kernel"] != want["sequence_kernel"]:
            wrong.append(f"{label} runs the {got['sequence_kernel']} kernel on PackedSequences after loading, "
                         f"not {want['sequence_kernel']}")
        elif want["native_weights"] is not None and got["native_weights"] != want["native_weights"]:
            wrong.append(f"{label} computes on {got['native_weights']} weights after loading, not "
                         f"{want['native_weights']}")
        elif want["kind"] == "LSTM" and want["kernel"] != "stock" and got["kernel_live"] is False:
            wrong.append(f"{label} cannot run its {want['kernel']} kernel after loading (its packs were not made)")
    return wrong


def _program_problems(ops: list[tuple[str, str]], calls: list) -> list[str]:
    from collections import Counter

    by_module = {(op, name) for op, name in calls if name is not None}
    if by_module or not calls:  # pt2 keeps each call's module; aoti only the op names
        return [f"{name or '<model>'}: the loaded program does not call lstmopt's {op}" for op, name in ops
                if (op, name) not in by_module]
    have, want = Counter(op for op, _ in calls), Counter(op for op, _ in ops)
    return [f"the loaded program calls lstmopt's {op} {have[op]} time(s), not {count}" for op, count in want.items()
            if have[op] < count]


def _undoing_cause(model: Optional[nn.Module], name: str) -> str:
    """Why loading may have rebuilt the module at ``name``: the nearest module around it whose class pickles
    itself its own way."""
    from lstmopt.modules.packs import pickles_its_own_way

    if model is None:
        return ""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        if pickles_its_own_way(type(owner)):
            cls = type(owner)
            return (f": {cls.__module__}.{cls.__qualname__} pickles itself its own way (its __setstate__ or "
                    "__reduce__ builds the model again when the file is loaded), which undoes the optimization")
    return ""
