"""The package layout is the architecture: layers import only the layers below them, with no cycle
(imports inside functions count), and the old import paths artifacts name keep working."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "lstmopt"
# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = ["base", "kernels", "modules", "rewrite", "artifacts", "job", "reporting", "cli"]
BASE = {"lstmopt", "lstmopt.errors", "lstmopt.choices", "lstmopt.environment", "lstmopt.demo", "lstmopt.digest"}
ALIASES = {"lstmopt.packed": "lstmopt.modules.lstm", "lstmopt.packing": "lstmopt.modules.packs",
           "lstmopt.native": "lstmopt.kernels.native"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    module = ALIASES.get(module, module)
    if module in BASE or module == "lstmopt.__main__":
        return "base" if module != "lstmopt.__main__" else "cli"
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lstmopt"):
            directory = PACKAGE.joinpath(*node.module.split(".")[1:])
            submodules = {a.name for a in node.names if (directory / f"{a.name}.py").exists()}
            found |= {f"{node.module}.{name}" for name in submodules}  # from lstmopt.kernels import native
            if len(submodules) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lstmopt")}
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: use absolute imports"
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if _module_name(p) not in ALIASES}


def test_every_module_imports_only_its_own_layer_and_those_below():
    wrong = []
    for module, imports in _graph().items():
        for target in imports:
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
                wrong.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_imports_itself_back_through_others():
    modules = _graph()
    graph = {m: {ALIASES.get(t, t) for t in ts if ALIASES.get(t, t) in modules} for m, ts in modules.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen and not nxt.startswith(start + "."):
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, " -> ".join(cycles[0])
