"""One batch job in its own isolated interpreter: ``python -I -m lstmopt.batch_worker FD``.

``lstmopt.job.batch`` starts this module with ``-I`` (nothing from the working directory or ``PYTHONPATH``
runs), writes the job to its stdin (a pickle: parent to child, both lstmopt), and reads events back as
JSON lines on file descriptor FD: ``["step", name]`` while it runs, ``["done", report]`` at the end. The
config's ``pythonpath`` comes after the installed packages, so model code cannot shadow what lstmopt
imports.

The job holds its output's lock (``files.output_lock``) while it runs; a job another run is writing
waits for it, and is then skipped if that run left it up to date.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys


class _Stop(KeyboardInterrupt):
    pass


def _stop(signum, frame):
    raise _Stop()


def main(fd: int) -> None:
    signal.signal(signal.SIGTERM, _stop)
    job = pickle.load(sys.stdin.buffer)
    events = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def send(kind, payload) -> None:
        events.write(json.dumps([kind, payload], default=str) + "\n")

    sys.path.extend(p for p in map(str, job["pythonpath"]) if p not in sys.path)
    from lstmopt.environment import hide_numpy_warning

    hide_numpy_warning()
    import torch

    from dataclasses import replace

    from lstmopt.job.batch import EXIT_INTERRUPTED, owned_by_lstmopt, up_to_date
    from lstmopt.artifacts.files import output_lock
    from lstmopt.job.pipeline import optimize_file

    torch.set_num_threads(job["threads"])
    batch_job = job["job"]
    try:
        with output_lock(batch_job.options.output, on_wait=lambda: send("step", "waiting for another run")):
            skipped = None if job["force"] else up_to_date(batch_job)
            if skipped is not None:
                send("done", skipped)
                return
            # Decided here, holding the lock: another run may have written the output while this one waited
            if batch_job.options.output.exists() and (job["force"] or owned_by_lstmopt(batch_job)):
                batch_job = replace(batch_job, options=replace(batch_job.options, force=True))  # redone
            report = optimize_file(batch_job.options, on_step=lambda step: send("step", step))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal; the parent reports it
        sys.exit(EXIT_INTERRUPTED)
    if job["warning"]:
        report.warnings.append(job["warning"])
    send("done", {"job": batch_job.name, **report.to_dict()})


if __name__ == "__main__":
    main(int(sys.argv[1]))
