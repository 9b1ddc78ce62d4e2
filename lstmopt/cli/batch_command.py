"""``lstmopt batch``: optimize every model of a YAML config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.text import Text

from lstmopt.cli import options
from lstmopt.cli.app import Failed, app
from lstmopt.cli.options import DebugOpt, JsonOpt, OUTPUT, QuietOpt
from lstmopt.cli.ui import UI


@app.command(epilog="Example: `OUT_DIR=build lstmopt batch configs/examples.yaml --jobs 2 --report batch.json "
                    "--summary batch.md`")
def batch(
    config: Annotated[Path, typer.Argument(help="YAML config: defaults and a list of jobs (see configs/).",
                                           show_default=False)],
    report: Annotated[Optional[Path], typer.Option(
        "--report", metavar="FILE", rich_help_panel=OUTPUT,
        help="Write the JSON batch report (schema lstmopt.batch-report/1; each job a lstmopt.report/1).")] = None,
    summary: Annotated[Optional[Path], typer.Option(
        "--summary", metavar="FILE", rich_help_panel=OUTPUT, help="Write a Markdown summary.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1,
                                      help="Jobs to run at once, each in its own process.")] = 1,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed job.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo jobs whose outputs are up to date, and replace "
                                                        "outputs lstmopt did not write.")] = False,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", metavar="I/N",
        help="Run slice I of N of the jobs (those at positions I-1, I-1+N, ... of the config), e.g. one per "
             "machine of a CI matrix; join the slices' --report files with `lstmopt merge-reports`.")] = None,
    show_variables: Annotated[bool, typer.Option(
        "--show-variables", rich_help_panel=OUTPUT,
        help="Show the values of the config's ${VAR}s in reports, summaries and messages (by default they "
             "are written back as ${VAR}: they may hold tokens or private paths).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Optimize every model of a YAML config; up-to-date outputs are skipped, failures do not stop the others."""
    from lstmopt.artifacts.files import atomic_write_text
    from lstmopt.job.batch import run_batch
    from lstmopt.job.config import load_config
    from lstmopt.reporting.display import batch_table
    from lstmopt.reporting.report import batch_markdown, write_json

    ui = UI(quiet=quiet, json_mode=json_out)
    slice_ = options.parse_shard(shard)
    loaded = load_config(config)
    if slice_ is not None:
        loaded = loaded.sharded(*slice_)
    _check_batch_paths(config, loaded, report, summary)
    redact = (lambda data: data) if show_variables else loaded.redact
    progress, on_event = _progress(ui, config, loaded, redact)

    def write_outputs(result) -> None:
        data = redact(result.to_dict())
        if report is not None:
            write_json(data, report)
        if summary is not None:
            atomic_write_text(summary, batch_markdown(str(config), data["jobs"]))
        ui.emit_json(data)
        ui.show(batch_table(data))

    try:
        with progress:
            result = run_batch(loaded, parallel=jobs, fail_fast=fail_fast, force=force, on_event=on_event)
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "batch_result", None)
        if partial is not None:
            write_outputs(partial)
        raise
    write_outputs(result)
    counts = result.counts()
    if result.exit_code != 0:
        failed = next(r for r in redact(result.to_dict())["jobs"] if r["exit_code"] != 0)
        raise Failed(f"{counts['failed']} of {counts['total']} jobs failed; first: {failed['job']}: "
                      f"{failed['error']}", result.exit_code)
    ui.show(f"[green]{counts['ok']} optimized, {counts['skipped']} up to date[/] ({counts['total']} jobs)")


def _check_batch_paths(config: Path, loaded, report: Optional[Path], summary: Optional[Path]) -> None:
    """Every file the batch reads and writes, checked before any job starts (``check_paths``)."""
    from lstmopt.artifacts.files import check_paths

    reads: dict = {"the config": config}
    writes: dict = {"the report": report, "the summary": summary}
    for job in loaded.jobs:
        reads[f"the input of job {job.name!r}"] = job.options.input
        reads[f"the example inputs of job {job.name!r}"] = job.options.example_inputs
        writes[f"the output of job {job.name!r}"] = job.options.output
    check_paths(reads, writes, create_dirs=True)


def _progress(ui: UI, config: Path, loaded, redact):
    """The batch's progress display and the run_batch event handler that drives it (a line per finished job)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=ui.err, disable=not ui.chatty)
    overall = progress.add_task(f"{config.name}", total=len(loaded.jobs))
    tasks: dict[int, Any] = {}

    def on_event(kind: str, index: int, payload: Any) -> None:
        name = redact(loaded.jobs[index].name)
        if kind == "done":
            payload = redact(payload)
        if kind == "start":
            tasks[index] = progress.add_task(f"  {name}: starting", total=None)
        elif kind == "step":
            progress.update(tasks[index], description=f"  {name}: {payload}")
        elif kind == "done":
            if index in tasks:
                progress.remove_task(tasks.pop(index))
            progress.advance(overall)
            if ui.chatty:
                ui.err.print(Text.assemble(_status_text(payload["status"]), f" {name}",
                                           f": {payload['error']}" if payload.get("error") else ""), soft_wrap=True)

    return progress, on_event


@app.command("merge-reports", epilog="Example: `lstmopt merge-reports shard-*.json --report batch.json --summary "
                                     "$GITHUB_STEP_SUMMARY`")
def merge_reports(
    reports: Annotated[list[Path], typer.Argument(
        help="The --report files of `lstmopt batch CONFIG --shard I/N`, one per slice I of N.", show_default=False)],
    report: Annotated[Optional[Path], typer.Option(
        "--report", metavar="FILE", rich_help_panel=OUTPUT,
        help="Write the merged JSON batch report (as one unsharded run writes it).")] = None,
    summary: Annotated[Optional[Path], typer.Option(
        "--summary", metavar="FILE", rich_help_panel=OUTPUT, help="Write a Markdown summary.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Join the reports of a sharded batch run into one; the exit code is the whole run's (0, or the first
    failed job's in config order)."""
    import json

    from lstmopt.artifacts.files import atomic_write_text, check_paths
    from lstmopt.errors import UsageError
    from lstmopt.job.batch import merge_reports as merge
    from lstmopt.reporting.display import batch_table
    from lstmopt.reporting.report import batch_markdown, write_json

    ui = UI(quiet=quiet, json_mode=json_out)
    check_paths({f"report {path}": path for path in reports}, {"the report": report, "the summary": summary})
    loaded = []
    for path in reports:
        try:
            loaded.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"cannot read the batch report {path}: {exc}") from exc
    data = merge(loaded)
    if report is not None:
        write_json(data, report)
    if summary is not None:
        atomic_write_text(summary, batch_markdown(data["config"], data["jobs"]))
    ui.emit_json(data)
    ui.show(batch_table(data))
    if data["exit_code"] != 0:
        failed = next((j for j in data["jobs"] if j["exit_code"] != 0), None)
        raise Failed(f"{data['summary']['failed']} of {data['summary']['total']} jobs failed" +
                     (f"; first: {failed['job']}: {failed['error']}" if failed else ""), data["exit_code"])
    ui.show(f"[green]{data['summary']['ok']} optimized, {data['summary']['skipped']} up to date[/] "
            f"({data['summary']['total']} jobs in {data['merged_shards']} shards)")


def _status_text(status: str) -> Text:
    style = {"ok": "green", "skipped": "cyan", "cancelled": "yellow"}.get(status, "red")
    return Text(status, style=style)
