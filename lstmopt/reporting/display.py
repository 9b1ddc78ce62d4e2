"""Rich renderings of reports for people: module tables, verification and benchmark summaries, trees."""

from __future__ import annotations

from typing import Any, Optional

from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from lstmopt.reporting.report import criterion_text, format_error

__all__ = ["batch_table", "benchmark_table", "model_tree", "modules_table", "verification_summary"]


def _decision(module: dict) -> Text:
    if not module["packed"]:
        return Text("kept", style="yellow")
    kernel, sequences = module.get("kernel") or "onednn", module.get("sequence_kernel") or "stock"
    if kernel == "stock" and sequences == "stock":
        return Text("kept by autotune", style="yellow")
    text = f"packed {module['packed_dtype']}" + ("" if kernel == "onednn" else f", {kernel} kernel")
    if sequences != "stock":
        text += f", sequences: {sequences}"
    if module.get("error_vs_fp32") is not None:
        text += f", error vs fp32 {module['error_vs_fp32']:.1e} ({module.get('error_inputs')})"
    return Text(text, style="green")


# Below this width, or where the table's unbroken columns leave the reason too little room, the LSTMs are
# listed one under another (name and decision, then the reason and the sizes, indented), so that no module
# name is broken and the reason keeps the whole line to wrap in.
_WIDE_TABLE = 110


def _direction(m: dict) -> str:
    kind = m.get("kind", "LSTM")
    if kind.endswith("Cell"):
        return kind
    return (("" if kind == "LSTM" else f"{kind}, ") + ("bi" if m["bidirectional"] else "uni")
            + (", batch_first" if m["batch_first"] else ""))


def _sizes(m: dict) -> str:
    return f"{m['input_size']}→{m['hidden_size']}, {m['num_layers']} layer{'s' * (m['num_layers'] > 1)}, {_direction(m)}"


def _module_name(m: dict) -> str:
    name = m["name"] or "<model>"
    if m.get("aliases"):
        name += " (= " + ", ".join(m["aliases"]) + ")"
    return name


class _ModulesTable:
    """The LSTMs table, laid out for the width it is printed at (a wide CI log, a narrow terminal)."""

    def __init__(self, modules: list[dict], title: str) -> None:
        self.modules, self.title = modules, title

    def __rich_console__(self, console, options):
        rows = [self._row(m) for m in self.modules]
        if options.max_width < max(_WIDE_TABLE, self._wide_width(rows)):
            yield from self._stacked()
        else:
            yield self._wide(rows)

    _HEADERS = ("module", "in→hidden", "layers", "dir", "dtype", "decision", "reason")
    _REASON_MIN = 20

    @staticmethod
    def _row(m: dict) -> list:
        return [_module_name(m), f"{m['input_size']}→{m['hidden_size']}", str(m["num_layers"]), _direction(m),
                m["dtype"], _decision(m), m["reason"]]

    def _wide_width(self, rows: list) -> int:
        """The narrowest the table can be: every column but the reason is never wrapped."""
        fixed = [max([len(h)] + [Text(str(r[i])).cell_len for r in rows]) for i, h in enumerate(self._HEADERS[:-1])]
        return sum(fixed) + self._REASON_MIN + 3 * len(self._HEADERS) + 1

    def _wide(self, rows: list) -> Table:
        table = Table(title=self.title, title_justify="left")
        table.add_column("module", no_wrap=True)
        table.add_column("in→hidden", no_wrap=True)
        table.add_column("layers", justify="right", no_wrap=True)
        table.add_column("dir", no_wrap=True)
        table.add_column("dtype", no_wrap=True)
        table.add_column("decision", no_wrap=True)
        table.add_column("reason", ratio=1, min_width=self._REASON_MIN)
        for row in rows:
            table.add_row(*row)
        return table

    def _stacked(self):
        yield Text(self.title, style="italic")
        for m in self.modules:
            yield Text.assemble("  ", (_module_name(m), "bold"), ": ", _decision(m))
            yield Padding(Text(m["reason"]), (0, 0, 0, 4))
            yield Padding(Text(f"{_sizes(m)}, {m['dtype']}", style="dim"), (0, 0, 0, 4))


def modules_table(modules: list[dict], *, title: str = "LSTMs") -> _ModulesTable:
    return _ModulesTable(modules, title)


def verification_summary(verification: dict, *, limit: int = 6) -> Table:
    checks = verification["model_outputs"] + verification["lstm_outputs"]
    failed = [c for c in checks if not c["ok"]]
    problems = verification.get("artifact_problems") or []
    verdict = ("[green]passed[/]" if verification["ok"] else
               "[red]failed: the loaded artifact does not hold the optimization[/]" if problems else
               f"[red]failed ({len(failed)} of {len(checks)})[/]")
    threads = f", {verification['threads']} threads" if verification.get("threads") else ""
    table = Table(title=f"Verification in a fresh process: {verdict}  ({criterion_text(verification)}{threads})",
                  title_justify="left")
    for column in ("output", "shape", "max abs error", "max rel error", "result"):
        table.add_column(column, justify="right" if "error" in column else "left")
    for problem in problems:  # what the loaded artifact lacks, before any output
        table.add_row("the loaded artifact", "", "", "", Text(problem, style="red"))
    shown = failed[:limit] if failed else _worst(checks, limit)
    for c in shown:
        result = Text("ok", style="green") if c["ok"] else Text(c.get("error") or "above tolerance", style="red")
        if c.get("vs_float64") is not None:  # the approximate-kernel contract judged it
            result.append(f" ({format_error(c['vs_float64'])} vs float64, bound {format_error(c['bound'])})")
        table.add_row(c["name"], "x".join(str(d) for d in c["shape"]), format_error(c["max_abs_error"]),
                      format_error(c["max_rel_error"]), result)
    hidden = len(failed if failed else checks) - len(shown)
    if hidden > 0:
        table.caption = f"{hidden} more {'failing ' if failed else ''}outputs not shown (see --report)"
    return table


def _worst(checks: list[dict], limit: int) -> list[dict]:
    return sorted(checks, key=lambda c: -(c["max_abs_error"] or 0.0))[:limit]


def _interval(case: dict) -> str:
    low, high = case.get("speedup_low"), case.get("speedup_high")
    return "—" if low is None or high is None else f"{low:.2f}-{high:.2f}x"


def benchmark_table(benchmark: dict, *, title: Optional[str] = None) -> Table:
    title = title or (f"Latency (median of {benchmark['rounds']} interleaved rounds, {benchmark['threads']} threads)"
                      f": speedup {benchmark['speedup']:.2f}x")
    table = Table(title=title, title_justify="left")
    for column in ("input", "original ms", "optimized ms", "speedup", "95% interval"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for case in benchmark["cases"]:
        style = "green" if case["speedup"] >= 1 else "red"
        if case.get("speedup_high") is not None and case.get("speedup_low") is not None:
            # A verdict only where the whole interval gives it.
            style = "green" if case["speedup_low"] > 1 else "red" if case["speedup_high"] < 1 else "default"
        table.add_row(case["input"], f"{case['original_ms']:.3f}", f"{case['optimized_ms']:.3f}",
                      Text(f"{case['speedup']:.2f}x", style=style), _interval(case))
    return table


def demo_table(runs: list[tuple[str, dict]]) -> Table:
    """``lstmopt demo``'s runs side by side: each one's kernel, verification, largest error against the original
    and speedup per input (one streaming frame, one second)."""
    cases = list(dict.fromkeys(case["input"] for _, d in runs for case in (d.get("benchmark") or {}).get("cases", [])))
    table = Table(title="The keyword spotter, three ways (speedup: the artifact against the original model)",
                  title_justify="left")
    for column in ("run", "kernel", "verified", "max error", *(f"speedup {c}" for c in cases)):
        table.add_column(column, justify="left" if column in ("run", "kernel") else "right")
    for name, data in runs:
        modules = [m for m in data.get("modules", []) if m.get("packed")]
        kernel = ", ".join(sorted({f"{m.get('kernel')} {m.get('packed_dtype')}" for m in modules})) or "—"
        verification = data.get("verification") or {}
        verified = Text("passed", style="green") if verification.get("ok") else Text(data.get("status", "—"), "red")
        error = verification.get("max_abs_error")
        error_text = "—" if error is None else "0 (bit-identical)" if error == 0 else f"{error:.1e}"
        speedups = {case["input"]: case for case in (data.get("benchmark") or {}).get("cases", [])}
        table.add_row(name, kernel, verified, error_text,
                      *(Text(f"{speedups[c]['speedup']:.2f}x", style="bold") if c in speedups else "—" for c in cases))
    return table


def _count(module: Any) -> int:
    from lstmopt.rewrite.quantized import weight_count

    return weight_count(module)


def model_tree(model: Any, modules: list[dict], *, label: str) -> Tree:
    """The module tree with parameter counts; LSTMs show their configuration and decision."""
    decisions = {m["name"]: m for m in modules}
    for m in modules:
        for alias in m.get("aliases", []):
            decisions[alias] = m

    def node_label(name: str, module: Any) -> Text:
        text = Text(f"{name.rsplit('.', 1)[-1] or label}: ", style="bold")
        text.append(module._get_name())  # torch.ao's modules say what they are: DynamicQuantizedLSTM
        text.append(f"  {_count(module):,} params", style="dim")
        if name in decisions:
            d = decisions[name]
            text.append(f"  [{d['input_size']}→{d['hidden_size']}, {d['num_layers']} layer(s), {_direction(d)}] ")
            text.append_text(_decision(d))
            if not d["packed"]:
                text.append(f": {d['reason']}", style="yellow")
        return text

    def add(tree: Tree, name: str, module: Any) -> None:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            branch = tree.add(node_label(full, child))
            if full not in decisions:  # an LSTM's internals are not interesting here
                add(branch, full, child)

    root = Tree(node_label("", model))
    if "" not in decisions:
        add(root, "", model)
    return root


def batch_table(batch: dict) -> Table:
    counts = batch["summary"]
    table = Table(title=f"Batch {batch['config']}: {counts['ok']} optimized, {counts['skipped']} up to date, "
                        f"{counts['failed']} failed, {counts['cancelled'] + counts['interrupted']} not finished",
                  title_justify="left")
    table.add_column("job", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for column in ("LSTMs packed", "max abs error", "speedup"):
        table.add_column(column, justify="right")
    table.add_column("output / error", ratio=1, min_width=20, overflow="fold")
    styles = {"ok": "green", "skipped": "cyan", "cancelled": "yellow"}
    for job in batch["jobs"]:
        modules = job.get("modules") or []
        verification = job.get("verification") or {}
        bench = job.get("benchmark") or {}
        detail = _short(job["output"]["path"]) if job.get("output") else (job.get("error") or "")
        table.add_row(job["job"], Text(job["status"], style=styles.get(job["status"], "red")),
                      f"{sum(m['packed'] for m in modules)}/{len(modules)}" if modules else "—",
                      format_error(verification.get("max_abs_error")) if verification else "—",
                      f"{bench['speedup']:.2f}x" if bench.get("speedup") else "—", detail)
    return table


def _short(path: str) -> str:
    """A path relative to the current directory when that is shorter."""
    import os

    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if len(relative) < len(path) else path
