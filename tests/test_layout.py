"""The package layout is the architecture: layers import only the layers below them, with no cycle
(imports inside functions count), and the old import paths artifacts name keep working."""

import ast
import re
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


# Sizes a newcomer can read: a source file on a few screens, a function on one.
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # of body, after the signature and the docstring
SOURCES = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cpp", ".h") and "__pycache__" not in p.parts]


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert SOURCES and not long, long


def _python_bodies(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
                body = body[1:]  # the docstring
            yield node.name, node.end_lineno - body[0].lineno + 1


def _cpp_bodies(path: Path):
    """Each function definition's name and body length: a line that opens a definition at namespace level (no
    indentation, a name and an argument list, not a declaration), to its closing brace at the same depth."""
    lines = [line.split("//")[0] for line in path.read_text().splitlines()]
    definition = re.compile(r"^(?:template <[^>]*> )?[A-Za-z_][\w:<>,\s*&]*?\b(\w+)\(")
    i = 0
    while i < len(lines):
        match = definition.match(lines[i])
        if match and not lines[i].startswith(("namespace", "TORCH_LIBRARY", "struct", "class")):
            j = i
            while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
                j += 1
            if j < len(lines) and "{" in lines[j]:
                depth, k = 0, j
                while True:
                    depth += lines[k].count("{") - lines[k].count("}")
                    if depth <= 0:
                        break
                    k += 1
                yield match.group(1), k - j + 1
                i = k
        i += 1


def test_no_function_is_over_60_lines():
    long = []
    for path in SOURCES:
        bodies = _python_bodies(path) if path.suffix == ".py" else _cpp_bodies(path)
        long += [f"{path.relative_to(ROOT)}: {name} ({n} lines)" for name, n in bodies if n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_the_size_checks_see_functions_in_both_languages():
    # The checks above must measure something: the kernel's run() and the pipeline's optimize_file are found
    cpp = dict(_cpp_bodies(PACKAGE / "kernels" / "csrc" / "lstm.cpp"))
    python = dict(_python_bodies(PACKAGE / "job" / "pipeline.py"))
    assert 20 < cpp["run"] <= MAX_FUNCTION_LINES and "recurrent" in cpp and "pack" in dict(
        _cpp_bodies(PACKAGE / "kernels" / "csrc" / "pack.cpp"))
    assert 10 < python["optimize_file"] <= MAX_FUNCTION_LINES


# One place per kind: lstmopt.modules holds the packed modules, lstmopt.rewrite.kinds their handlers. Elsewhere
# code asks isinstance(m, PackedModule) and the module's own methods, never which kind it is.
KIND_HOMES = ("modules", "rewrite/kinds")


def test_only_the_modules_and_their_handlers_ask_which_packed_kind_a_module_is():
    asks = re.compile(r"isinstance\([^)]*\bPacked(LSTM|GRU|Cell|LSTMCell|GRUCell)\b")
    found = set()
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        if not where.startswith(KIND_HOMES) and asks.search(path.read_text()):
            found.add(where)
    assert not found, found
    assert asks.search("isinstance(module, (nn.Linear, PackedGRU))")  # the check itself sees one
