"""The machine-readable report (JSON, schema ``lstmopt.report/1``) and its Markdown summary.

The JSON schema ships with the package (``lstmopt/schemas/report-1.json``); the README documents it.
A batch run writes ``lstmopt.batch-report/1``: its ``jobs`` are reports of schema ``lstmopt.report/1``.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from lstmopt.artifacts.files import atomic_write_text
from lstmopt.job.batch import BATCH_SCHEMA

__all__ = ["BATCH_SCHEMA", "batch_markdown", "format_error", "report_json", "report_markdown", "schema", "write_json"]


_STATUS_MARK = {"ok": "✅", "skipped": "⏭️"}


def schema() -> dict:
    """The JSON Schema of ``lstmopt.report/1``."""
    return json.loads(resources.files("lstmopt").joinpath("schemas/report-1.json").read_text())


def _finite(obj: Any) -> Any:
    """JSON has no Infinity or NaN: an error that could not be measured is null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def report_json(data: dict) -> str:
    return json.dumps(_finite(data), indent=2, allow_nan=False, default=str) + "\n"


def write_json(data: dict, path: Path) -> None:
    atomic_write_text(Path(path), report_json(data))


def criterion_text(verification: dict) -> str:
    """What a verification judged by: its tolerance, or the approximate-kernel contract."""
    if verification.get("criterion") == "float64":
        return f"errors against the float64 original within {verification['factor']:g}x the fp32 original's own"
    return f"atol {verification['atol']:g}, rtol {verification['rtol']:g}"


def format_error(value: Any) -> str:
    """An error for people: "0" when exact, "n/a" when it could not be measured."""
    if value is None or value != value or value == float("inf"):
        return "n/a"
    return "0" if value == 0 else f"{value:.2e}"


def _weights_origin(input: dict) -> str:
    key, prefix = input.get("state_dict_key"), input.get("stripped_prefix")
    return (f"; weights: `{key}` entry" if key else "") + (f"; prefix `{prefix}` stripped" if prefix else "")


def _method(data: dict) -> str:
    how = data.get("artifact") or {}
    return f", {how['method']}" if how.get("method") in ("scripted", "traced") else ""


def _direction(module: dict) -> str:
    kind = module.get("kind", "LSTM")
    if kind.endswith("Cell"):
        return kind
    return ("" if kind == "LSTM" else f"{kind}, ") + ("bi" if module["bidirectional"] else "uni")


def report_markdown(data: dict, *, heading: str = "##") -> str:
    """A CI job summary for one report."""
    status = data["status"]
    mark = _STATUS_MARK.get(status, "❌")
    lines = [f"{heading} {mark} lstmopt: `{Path(data['input'].get('path', '?')).name}` — {status}", ""]
    if data.get("error"):
        lines += [f"**Error:** {data['error']}", ""]
    for warning in data.get("warnings", []):
        lines += [f"> ⚠️ {warning}", ""]
    output = data.get("output")
    env = data.get("environment", {})
    lines += [
        "| | |", "|---|---|",
        f"| Input | `{data['input'].get('path')}` (sha256 `{str(data['input'].get('sha256', ''))[:12]}`"
        f"{_weights_origin(data['input'])}) |",
        f"| Output | `{output['path']}` ({output['format']}{_method(data)}, {output['bytes'] / 1e6:.1f} MB) |" if output
        else "| Output | none written |",
        f"| dtype | {data.get('options', {}).get('dtype', '?')} |",
        f"| Environment | lstmopt {env.get('lstmopt')}, torch {env.get('torch')}, oneDNN {env.get('onednn')}, "
        f"{env.get('cpu_isa')}, {env.get('threads')} threads |",
        "",
    ]
    modules = data.get("modules") or []
    if modules:
        lines += ["| LSTM | input | hidden | layers | dir | decision | reason |", "|---|---|---|---|---|---|---|"]
        for m in modules:
            decision = f"packed ({m['packed_dtype']})" if m["packed"] else "kept"
            kernels = [k for k in (m.get("kernel"), m.get("sequence_kernel") and f"sequences: {m['sequence_kernel']}")
                       if k and k not in ("onednn", "sequences: stock")]
            decision += f", {', '.join(kernels)}" if kernels and m["packed"] else ""
            if m.get("error_vs_fp32") is not None:
                decision += f", error vs fp32 {format_error(m['error_vs_fp32'])} ({m.get('error_inputs')})"
            lines.append(f"| `{m['name'] or '<model>'}` | {m['input_size']} | {m['hidden_size']} | {m['num_layers']} "
                         f"| {_direction(m)} | {decision} | {m['reason']} |")
        lines.append("")
    verification = data.get("verification")
    if verification:
        verdict = "passed" if verification["ok"] else "**failed**"
        lines += [f"**Verification** {verdict} in a fresh process: max abs error "
                  f"{format_error(verification['max_abs_error'])}, max rel error "
                  f"{format_error(verification['max_rel_error'])} ({criterion_text(verification)}; "
                  f"both sides at {verification.get('threads')} threads; "
                  f"{len(verification['model_outputs'])} model outputs, "
                  f"{len(verification['lstm_outputs'])} LSTM outputs).", ""]
    bench = data.get("benchmark")
    if bench:
        lines += [f"**Speedup** {bench['speedup']:.2f}× (geometric mean, median of {bench['rounds']} interleaved "
                  "rounds)", "", "| input | original ms | optimized ms | speedup | 95% interval |",
                  "|---|---|---|---|---|"]
        for case in bench["cases"]:
            low, high = case.get("speedup_low"), case.get("speedup_high")
            interval = "—" if low is None or high is None else f"{low:.2f}-{high:.2f}×"
            lines.append(f"| {case['input']} | {case['original_ms']:.3f} | {case['optimized_ms']:.3f} | "
                         f"{case['speedup']:.2f}× | {interval} |")
        lines.append("")
    return "\n".join(lines)


def batch_markdown(config: str, jobs: Iterable[dict]) -> str:
    """A CI job summary for a batch run: one table row per job, then each failure's error."""
    jobs = list(jobs)
    failed = [j for j in jobs if j["status"] not in ("ok", "skipped")]
    mark = "❌" if failed else "✅"
    lines = [f"## {mark} lstmopt batch `{config}`: {len(jobs) - len(failed)}/{len(jobs)} jobs succeeded", "",
             "| job | status | LSTMs packed | max abs error | speedup | output |", "|---|---|---|---|---|---|"]
    for job in jobs:
        modules = job.get("modules") or []
        packed = f"{sum(m['packed'] for m in modules)}/{len(modules)}"
        verification = job.get("verification") or {}
        bench = job.get("benchmark") or {}
        speedup = f"{bench['speedup']:.2f}×" if bench.get("speedup") else "—"
        output = f"`{job['output']['path']}`" if job.get("output") else "—"
        lines.append(f"| {job.get('job', '?')} | {_STATUS_MARK.get(job['status'], '❌')} {job['status']} | {packed} "
                     f"| {format_error(verification.get('max_abs_error')) if verification else '—'} | {speedup} "
                     f"| {output} |")
    if failed:
        lines += ["", "**Failures**", ""]
        lines += [f"- `{j.get('job', '?')}`: {j.get('error')}" for j in failed]
    return "\n".join(lines) + "\n"
