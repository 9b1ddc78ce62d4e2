"""Batch runs: every job of a config, each in its own process, resumable, interruptible.

- Each job runs ``pipeline.optimize_file`` in a fresh, isolated interpreter (``lstmopt.job.batch_worker``), so
  a job that crashes the interpreter fails alone; ``parallel`` jobs run at once, each with its share of
  the CPU threads. Workers die with the batch.
- A job whose output was written by lstmopt from the same input bytes, with the same options and the same
  model code (the source files of the user's modules the job imported), is skipped (``force`` redoes it).
  An existing file lstmopt did not write is only replaced with ``force``. Two runs of one config at once
  take turns on each output (``files.output_lock``).
- One failing job never stops the others unless ``fail_fast``; then running jobs are stopped and the
  rest are reported as cancelled.
- ``--shard I/N`` runs a deterministic slice of the jobs (``BatchConfig.sharded``); ``merge_reports``
  joins the shards' reports into the report one unsharded run would have written.
- Ctrl-C or SIGTERM stops the workers, which remove their temporary files on the way out: finished
  outputs stay, unfinished ones never appear. What a SIGKILL leaves (a hidden temporary file beside an
  output) is removed when the job runs again.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from lstmopt.job.children import isolated_python, preexec
from lstmopt.job.config import BatchConfig, BatchJob
from lstmopt.job.pipeline import Report
from lstmopt.artifacts import ledger
from lstmopt.job.user_code import code_changed

__all__ = ["BatchResult", "merge_reports", "run_batch", "up_to_date"]

EXIT_INTERRUPTED = 130
BATCH_SCHEMA = "lstmopt.batch-report/1"  # each job a lstmopt.report/1 (``pipeline.SCHEMA``)

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
        return _counts(statuses, len(statuses))

    def to_dict(self) -> dict:
        status = "interrupted" if self.interrupted else ("ok" if self.exit_code == 0 else "failed")
        return {"schema": BATCH_SCHEMA, "config": str(self.config.path), "config_sha256": self.config.sha256,
                "shard": self.config.shard, "status": status,
                "exit_code": self.exit_code, "parallel": self.parallel, "fail_fast": self.fail_fast,
                "summary": self.counts(), "environment": self.environment, "started": self.started,
                "finished": self.finished, "jobs": self._job_reports()}

    def _job_reports(self) -> list[dict]:
        """The reports of the jobs that ran; in a shard, each with its position in the whole config."""
        if self.config.shard is None:
            return [r for r in self.reports if r is not None]
        return [dict(r, config_index=i) for r, i in zip(self.reports, self.config.shard["jobs"]) if r is not None]


def merge_reports(reports: list[dict]) -> dict:
    """The batch report of a whole config from its shards' reports (``lstmopt batch --shard I/N`` each):
    jobs in config order, counts and exit code recomputed, each shard's environment kept. UsageError unless
    the reports are the N shards of one config, each once.

    Example:
        >>> merged = merge_reports([json.load(open(f"shard-{i}.json")) for i in (1, 2, 3)])
    """
    from lstmopt.errors import UsageError

    if not reports:
        raise UsageError("no reports to merge")
    for report in reports:
        if not isinstance(report, dict) or report.get("schema") != BATCH_SCHEMA:
            raise UsageError(f"not a batch report (schema {BATCH_SCHEMA})")
        if not isinstance(report.get("shard"), dict):
            raise UsageError("a report of an unsharded run cannot be merged: it covers the whole config already")
    first = reports[0]
    if any(r.get("config_sha256") != first.get("config_sha256") for r in reports):
        raise UsageError("the reports come from different configs (or versions of one): merge the shards of one run")
    counts = {r["shard"]["count"] for r in reports}
    if len(counts) != 1:
        raise UsageError(f"the reports split the config in different numbers of shards ({sorted(counts)})")
    count = counts.pop()
    seen = sorted(r["shard"]["index"] for r in reports)
    if seen != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(seen))
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise UsageError(f"the shards of {count} are not all here once: " + "; ".join(
            part for part in (f"missing {', '.join(f'{i}/{count}' for i in missing)}" if missing else "",
                              f"twice {', '.join(f'{i}/{count}' for i in twice)}" if twice else "") if part))
    jobs = sorted((job for report in reports for job in report["jobs"]), key=lambda job: job["config_index"])
    summary = _counts([job["status"] for job in jobs], first["shard"]["config_jobs"])
    interrupted = any(r["status"] == "interrupted" for r in reports)
    exit_code = EXIT_INTERRUPTED if interrupted else next((j["exit_code"] for j in jobs if j["exit_code"] != 0), 0)
    by_shard = sorted(reports, key=lambda r: r["shard"]["index"])
    return {"schema": BATCH_SCHEMA, "config": first["config"], "config_sha256": first.get("config_sha256"),
            "shard": None, "merged_shards": count,
            "status": "interrupted" if interrupted else ("ok" if exit_code == 0 else "failed"),
            "exit_code": exit_code, "parallel": first.get("parallel"), "fail_fast": first.get("fail_fast"),
            "summary": summary, "environment": first.get("environment"),
            "environments": [r.get("environment") for r in by_shard],
            "started": min(r["started"] for r in reports), "finished": max(r["finished"] for r in reports),
            "jobs": jobs}


def _counts(statuses: list[str], total: int) -> dict:
    """A batch report's summary: how many jobs of ``total`` ended in each state (``not_run``: never started)."""
    return {"total": total, "ok": statuses.count("ok"), "skipped": statuses.count("skipped"),
            "cancelled": statuses.count("cancelled"), "interrupted": statuses.count("interrupted"),
            "failed": sum(s not in ("ok", "skipped", "cancelled", "interrupted", "not_run") for s in statuses)}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _report(job: BatchJob, status: str, *, error: Optional[str] = None, exit_code: int = 0,
            warnings: tuple = ()) -> dict:
    from lstmopt.environment import describe

    report = Report(options=job.options, status=status, exit_code=exit_code, error=error, warnings=list(warnings),
                    input={"path": str(job.options.input)}, environment=describe(), started=_now(), finished=_now())
    return {"job": job.name, **report.to_dict()}


def import_paths(config: BatchConfig) -> tuple:
    """Where a job's worker imports the user's code from: the config's ``pythonpath``, then the user's own
    ``PYTHONPATH``, which the isolated worker (``python -I``) would ignore, as ``lstmopt optimize`` honours it."""
    user = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return tuple(dict.fromkeys([*map(str, config.pythonpath), *user]))


def up_to_date(job: BatchJob) -> Optional[dict]:
    """The skipped-job report if ``job``'s output already reflects its input and options, else None."""
    from lstmopt.errors import LstmoptError
    from lstmopt.artifacts.files import sha256_file
    from lstmopt.artifacts.writing import read_metadata

    options = job.options
    if not options.output.is_file() or not options.input.is_file():
        return None
    try:
        meta = read_metadata(options.output)
    except LstmoptError:
        return None  # not an lstmopt artifact: the job decides (it needs force to replace it)
    digest, fingerprint, made = sha256_file(options.input), options.fingerprint(), sha256_file(options.output)
    if meta.get("source", {}).get("sha256") != digest or meta.get("options_sha256") != fingerprint:
        return None
    # The metadata is anyone's to write: only lstmopt's own record of what it wrote proves the file is its
    # output, complete, from this input and these options
    if not ledger.proves(options.output, sha256=made, source_sha256=digest, options_sha256=fingerprint):
        return None
    if code_changed(meta.get("user_code", {})):
        return None
    report = _report(job, "skipped", warnings=("up to date: the output was made from this input with these "
                                               "options (use --force to redo it)",))
    report["input"].update(sha256=digest, format=meta["source"].get("format"))
    report["modules"] = meta.get("modules", [])
    report["output"] = {"path": str(options.output), "format": meta.get("format"), "sha256": made,
                        "bytes": options.output.stat().st_size}
    return report


def owned_by_lstmopt(job: BatchJob) -> bool:
    from lstmopt.errors import LstmoptError
    from lstmopt.artifacts.writing import read_metadata

    try:
        read_metadata(job.options.output)
        return True
    except LstmoptError:
        return False


class _Worker:
    """A job's process (``lstmopt.job.batch_worker``) and the events it sends back."""

    def __init__(self, index: int, job: BatchJob, payload: dict):
        self.index, self.job = index, job
        read, write = os.pipe()
        try:
            self.process = subprocess.Popen(isolated_python("-m", "lstmopt.job.batch_worker", str(write)),
                                            stdin=subprocess.PIPE, pass_fds=(write,), preexec_fn=preexec())
        finally:
            os.close(write)
        self.fd, self.buffer, self.closed, self.released = read, b"", False, False
        os.set_blocking(read, False)
        try:
            self.process.stdin.write(pickle.dumps(payload))
            self.process.stdin.close()
        except BrokenPipeError:  # it died at once; its exit status says why
            pass

    def events(self) -> list:
        """The events that have arrived (``closed`` once the worker has sent its last)."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def release(self, selector: selectors.BaseSelector) -> None:
        if not self.released:
            self.released = True
            selector.unregister(self.fd)
            os.close(self.fd)


def run_batch(config: BatchConfig, *, parallel: int = 1, fail_fast: bool = False, force: bool = False,
              on_event: Optional[Event] = None) -> BatchResult:
    """Run every job of ``config``; see the module docstring. On Ctrl-C/SIGTERM the workers are stopped, the
    interrupted jobs are reported as such, and the KeyboardInterrupt is re-raised with ``.batch_result``."""
    from lstmopt.environment import describe

    result = BatchResult(config, [None] * len(config.jobs), started=_now(), parallel=parallel, fail_fast=fail_fast,
                         environment=describe())
    batch = _Scheduler(config, result, parallel, fail_fast, force, on_event or (lambda kind, index, payload: None))
    try:
        while batch.pending or batch.running:
            batch.start_workers()
            if batch.stopped_by is not None:
                batch.cancel_the_rest()
                break
            for key, _ in batch.selector.select(timeout=0.5):
                batch.handle(key.data)
    except KeyboardInterrupt as exc:
        batch.interrupted()
        exc.batch_result = result  # type: ignore[attr-defined]
        raise
    finally:
        batch.selector.close()
    result.finished = _now()
    return result


class _Scheduler:
    """run_batch's state: the jobs not started, the workers running (read through one selector), and the job whose
    failure stopped the batch under --fail-fast."""

    def __init__(self, config: BatchConfig, result: BatchResult, parallel: int, fail_fast: bool, force: bool,
                 notify: Event):
        self.config, self.result, self.parallel, self.fail_fast, self.force = config, result, parallel, fail_fast, force
        self.notify = notify
        self.threads = max(1, (os.cpu_count() or 1) // parallel)
        self.warning = (f"timed while up to {parallel} jobs ran in parallel: latencies are noisier than in a "
                        "sequential run") if parallel > 1 else None
        self.pending = list(range(len(config.jobs)))
        self.running: dict[int, _Worker] = {}
        self.stopped_by: Optional[str] = None
        self.selector = selectors.DefaultSelector()

    def finish(self, index: int, report: dict) -> None:
        self.result.reports[index] = report
        worker = self.running.pop(index, None)
        if worker is not None:
            worker.release(self.selector)
        self.notify("done", index, report)
        if self.fail_fast and report["exit_code"] != 0 and self.stopped_by is None:
            self.stopped_by = self.config.jobs[index].name

    def start_workers(self) -> None:
        """Start pending jobs up to the parallel limit (a job whose output is up to date finishes at once)."""
        while self.pending and len(self.running) < self.parallel and self.stopped_by is None:
            index = self.pending.pop(0)
            job = self.config.jobs[index]
            skipped = None if self.force else up_to_date(job)
            if skipped is not None:
                self.notify("start", index, job)
                self.finish(index, skipped)
                continue
            job.options.output.parent.mkdir(parents=True, exist_ok=True)  # a config describes a tree
            # Whether to replace an existing output is decided by the worker, once it holds the output's lock:
            # another run may be writing it now
            worker = _Worker(index, job, {"job": job, "threads": self.threads, "pythonpath": import_paths(self.config),
                                          "warning": self.warning, "force": self.force})
            self.running[index] = worker
            self.selector.register(worker.fd, selectors.EVENT_READ, worker)
            self.notify("start", index, job)

    def handle(self, worker: _Worker) -> None:
        for kind, payload in worker.events():
            if kind == "step":
                self.notify("step", worker.index, payload)
            elif worker.index in self.running:
                worker.process.wait()
                self.finish(worker.index, payload)
        if worker.closed and worker.index in self.running:  # it ended without a report: a crash
            code = worker.process.wait()
            cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            self.finish(worker.index, _report(self.config.jobs[worker.index], "error", exit_code=1,
                                              error=f"the job's process died ({cause}) without a report"))

    def cancel_the_rest(self) -> None:
        """--fail-fast: stop the running jobs and cancel the pending ones."""
        _stop_workers(self.running)
        for index in list(self.running):
            self.finish(index, _report(self.config.jobs[index], "cancelled",
                                       error=f"stopped: --fail-fast after job {self.stopped_by!r} failed"))
        for index in self.pending:
            self.finish(index, _report(self.config.jobs[index], "cancelled",
                                       error=f"not run: --fail-fast after job {self.stopped_by!r} failed"))
        self.pending = []

    def interrupted(self) -> None:
        _stop_workers(self.running)
        for worker in list(self.running.values()):  # a job that finished as the interrupt came keeps its report
            for kind, payload in worker.events():
                if kind == "done" and worker.index in self.running:
                    self.finish(worker.index, payload)
        for index in list(self.running) + self.pending:
            self.result.reports[index] = _report(
                self.config.jobs[index], "interrupted", exit_code=EXIT_INTERRUPTED,
                error="interrupted before the job finished; no partial output was left")
        self.result.interrupted = True
        self.result.finished = _now()


def _stop_workers(running: dict) -> None:
    """SIGTERM each worker (it unwinds and removes its temporary file), then wait; kill stragglers."""
    for worker in running.values():
        if worker.process.poll() is None:
            worker.process.terminate()
    deadline = time.monotonic() + 30
    for worker in running.values():
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
