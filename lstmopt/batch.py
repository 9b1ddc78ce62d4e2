"""Batch runs: every job of a config, each in its own process, resumable, interruptible.

- Each job runs ``pipeline.optimize_file`` in a fresh (spawned) process, so a job that crashes the
  interpreter fails alone; ``parallel`` jobs run at once, each with its share of the CPU threads.
- A job whose output was written by lstmopt from the same input bytes with the same options is skipped
  (``force`` redoes it). An existing file lstmopt did not write is only replaced with ``force``.
- One failing job never stops the others unless ``fail_fast``; then running jobs are stopped and the
  rest are reported as cancelled.
- Ctrl-C or SIGTERM stops the workers, which remove their temporary files on the way out: finished
  outputs stay, unfinished ones never appear. What a SIGKILL leaves (a hidden temporary file beside an
  output) is removed when the job runs again.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import os
import queue
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .config import BatchConfig, BatchJob
from .environment import hide_numpy_warning
from .files import stale_temp_files
from .pipeline import Report, optimize_file
from .report import BATCH_SCHEMA

__all__ = ["BatchResult", "run_batch", "up_to_date"]

EXIT_INTERRUPTED = 130

Event = Callable[[str, int, object], None]  # (kind, job index, payload): start, step, done


@dataclass
class BatchResult:
    config: BatchConfig
    reports: list[Optional[dict]]
    started: str
    finished: str = ""
    interrupted: bool = False
    parallel: int = 1
    fail_fast: bool = False
    environment: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded or was up to date, else the first failed job's exit code."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        for report in self.reports:
            if report is not None and report["exit_code"] != 0:
                return report["exit_code"]
        return 0

    def counts(self) -> dict:
        statuses = [r["status"] if r else "not_run" for r in self.reports]
        return {"total": len(statuses), "ok": statuses.count("ok"), "skipped": statuses.count("skipped"),
                "cancelled": statuses.count("cancelled"), "interrupted": statuses.count("interrupted"),
                "failed": sum(s not in ("ok", "skipped", "cancelled", "interrupted", "not_run") for s in statuses)}

    def to_dict(self) -> dict:
        status = "interrupted" if self.interrupted else ("ok" if self.exit_code == 0 else "failed")
        return {"schema": BATCH_SCHEMA, "config": str(self.config.path), "status": status,
                "exit_code": self.exit_code, "parallel": self.parallel, "fail_fast": self.fail_fast,
                "summary": self.counts(), "environment": self.environment, "started": self.started,
                "finished": self.finished, "jobs": [r for r in self.reports if r is not None]}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _report(job: BatchJob, status: str, *, error: Optional[str] = None, exit_code: int = 0,
            warnings: tuple = ()) -> dict:
    from .environment import describe

    report = Report(options=job.options, status=status, exit_code=exit_code, error=error, warnings=list(warnings),
                    input={"path": str(job.options.input)}, environment=describe(), started=_now(), finished=_now())
    return {"job": job.name, **report.to_dict()}


def up_to_date(job: BatchJob) -> Optional[dict]:
    """The skipped-job report if ``job``'s output already reflects its input and options, else None."""
    from .errors import LstmoptError
    from .files import sha256_file
    from .writing import read_metadata

    options = job.options
    if not options.output.is_file() or not options.input.is_file():
        return None
    try:
        meta = read_metadata(options.output)
    except LstmoptError:
        return None  # not an lstmopt artifact: the job decides (it needs force to replace it)
    digest = sha256_file(options.input)
    if meta.get("source", {}).get("sha256") != digest or meta.get("options_sha256") != options.fingerprint():
        return None
    report = _report(job, "skipped", warnings=("up to date: the output was made from this input with these "
                                               "options (use --force to redo it)",))
    report["input"].update(sha256=digest, format=meta["source"].get("format"))
    report["modules"] = meta.get("modules", [])
    report["output"] = {"path": str(options.output), "format": meta.get("format"),
                        "sha256": sha256_file(options.output), "bytes": options.output.stat().st_size}
    return report


def _owned_by_lstmopt(job: BatchJob) -> bool:
    from .errors import LstmoptError
    from .writing import read_metadata

    try:
        read_metadata(job.options.output)
        return True
    except LstmoptError:
        return False


class _Stop(KeyboardInterrupt):
    pass


def _stop(signum, frame):
    raise _Stop()


def _worker(index: int, job: BatchJob, events, threads: int, pythonpath: tuple, warning: Optional[str]) -> None:
    """Run one job in this (spawned) process and send its report back."""
    import sys

    signal.signal(signal.SIGTERM, _stop)
    sys.path[:0] = [str(p) for p in pythonpath]
    hide_numpy_warning()
    import torch

    torch.set_num_threads(threads)
    try:
        report = optimize_file(job.options, on_step=lambda step: events.put(("step", index, step)))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal; the parent reports it
        sys.exit(EXIT_INTERRUPTED)
    if warning:
        report.warnings.append(warning)
    events.put(("done", index, {"job": job.name, **report.to_dict()}))


def run_batch(config: BatchConfig, *, parallel: int = 1, fail_fast: bool = False, force: bool = False,
              on_event: Optional[Event] = None) -> BatchResult:
    """Run every job of ``config``; see the module docstring. On Ctrl-C/SIGTERM the workers are stopped, the
    interrupted jobs are reported as such, and the KeyboardInterrupt is re-raised with ``.batch_result``."""
    from .environment import describe

    notify = on_event or (lambda kind, index, payload: None)
    result = BatchResult(config, [None] * len(config.jobs), started=_now(), parallel=parallel, fail_fast=fail_fast,
                         environment=describe())
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // parallel)
    warning = (f"timed while up to {parallel} jobs ran in parallel: latencies are noisier than in a "
               "sequential run") if parallel > 1 else None
    pending = list(range(len(config.jobs)))
    running: dict[int, multiprocessing.Process] = {}
    stopped_by: Optional[str] = None

    def finish(index: int, report: dict) -> None:
        nonlocal stopped_by
        result.reports[index] = report
        running.pop(index, None)
        notify("done", index, report)
        if fail_fast and report["exit_code"] != 0 and stopped_by is None:
            stopped_by = config.jobs[index].name

    try:
        while pending or running:
            while pending and len(running) < parallel and stopped_by is None:
                index = pending.pop(0)
                job = config.jobs[index]
                skipped = None if force else up_to_date(job)
                if skipped is not None:
                    notify("start", index, job)
                    finish(index, skipped)
                    continue
                job.options.output.parent.mkdir(parents=True, exist_ok=True)  # a config describes a tree
                for leftover in stale_temp_files(job.options.output):  # from a run killed with SIGKILL
                    leftover.unlink(missing_ok=True)
                if job.options.output.exists() and (force or _owned_by_lstmopt(job)):
                    job = replace(job, options=replace(job.options, force=True))  # an outdated artifact is redone
                process = context.Process(target=_worker, name=f"lstmopt-{job.name}", daemon=True,
                                          args=(index, job, events, threads, config.pythonpath, warning))
                process.start()
                running[index] = process
                notify("start", index, job)
            if stopped_by is not None:
                _stop_workers(running)
                for index in list(running):
                    finish(index, _report(config.jobs[index], "cancelled",
                                          error=f"stopped: --fail-fast after job {stopped_by!r} failed"))
                for index in pending:
                    finish(index, _report(config.jobs[index], "cancelled",
                                          error=f"not run: --fail-fast after job {stopped_by!r} failed"))
                pending = []
                break
            try:
                kind, index, payload = events.get(timeout=0.1)
            except queue.Empty:
                for index, process in list(running.items()):
                    if not process.is_alive() and index in running:
                        _drain(events, finish, notify)
                        if index in running:  # died without reporting: a crash, not a failure it could report
                            code = process.exitcode
                            cause = (f"signal {signal.Signals(-code).name}" if code is not None and code < 0
                                     else f"exit status {code}")
                            finish(index, _report(config.jobs[index], "error", exit_code=1,
                                                  error=f"the job's process died ({cause}) without a report"))
                continue
            if kind == "step":
                notify("step", index, payload)
            else:
                running[index].join()
                finish(index, payload)
    except KeyboardInterrupt as exc:
        _stop_workers(running)
        _drain(events, finish, notify)
        for index in list(running) + pending:
            result.reports[index] = _report(config.jobs[index], "interrupted", exit_code=EXIT_INTERRUPTED,
                                            error="interrupted before the job finished; no partial output was left")
        result.interrupted = True
        result.finished = _now()
        exc.batch_result = result  # type: ignore[attr-defined]
        raise
    finally:
        events.close()
    result.finished = _now()
    return result


def _drain(events, finish, notify) -> None:
    while True:
        try:
            kind, index, payload = events.get_nowait()
        except (queue.Empty, OSError, ValueError):
            return
        if kind == "done":
            finish(index, payload)
        else:
            notify(kind, index, payload)


def _stop_workers(running: dict) -> None:
    """SIGTERM each worker (it unwinds and removes its temporary file), then wait; kill stragglers."""
    for process in running.values():
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 30
    for process in running.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
