"""Saved model in, verified optimized model out: the job behind ``lstmopt optimize`` and batch runs.

``optimize_file(options)`` loads the input safely, rewrites its LSTMs, writes the artifact to a temporary
file, verifies it in a fresh process, optionally benchmarks it, and only then moves it to the output
path: a run that fails or is interrupted leaves no output, and the input is never written. It returns a
``Report`` (the JSON report's content) and raises nothing a user can act on: failures are recorded in
the report's ``status``, ``error`` and ``exit_code``.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

from lstmopt import __version__
from lstmopt.errors import LstmoptError, NothingToOptimizeError, SpeedupError, UsageError, one_line
from lstmopt.choices import AUTO, DTYPES, FORMAT_CHOICES, QUANTIZED_DTYPES, RECURRENT_CLASSES, names_a_function
from lstmopt.artifacts import ledger
from lstmopt.job.user_code import user_code

__all__ = ["OptimizeOptions", "Report", "optimize_file", "SCHEMA"]

SCHEMA = "lstmopt.report/1"
STATUS_BY_ERROR = {
    "UsageError": "error", "UnsupportedError": "error", "UntrustedPickleError": "refused_untrusted",
    "NothingToOptimizeError": "nothing_to_optimize", "VerificationError": "verification_failed",
    "SpeedupError": "too_slow",
}


@dataclass
class OptimizeOptions:
    """Everything one optimization job needs; the CLI's options and a batch job's keys map onto it."""

    input: Path
    output: Path
    format: str = AUTO  # or one of FORMATS (lstmopt.job.route)
    dtype: str = "float32"
    factory: Optional[str] = None
    factory_kwargs: dict = field(default_factory=dict)
    trust: bool = False
    state_dict_key: Optional[str] = None  # where the weights are in a training checkpoint (see lstmopt.artifacts.checkpoints)
    strip_prefix: Optional[str] = None  # removed from every key of the checkpoint's state dict
    example_inputs: Optional[Union[Path, str]] = None  # a file, or a function package.module:function
    input_shape: Optional[tuple[int, int, int]] = None
    inputs: Optional[list[str]] = None  # --input specs, one per argument (lstmopt.job.input_specs)
    atol: Optional[float] = None  # None: the dtype's default (see verification.default_tolerance)
    rtol: Optional[float] = None
    verify: bool = True
    autotune: bool = False  # time each LSTM's kernels on the samples and keep the fastest
    approx: bool = False  # let autotune pick approximate kernels (lstmopt.kernels.accuracy)
    benchmark: bool = False
    min_speedup: Optional[float] = None
    require_lstm: bool = False
    force: bool = False
    seed: Optional[int] = None  # seed the random generators before each compared call (models that sample)

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        if self.example_inputs is not None and not names_a_function(str(self.example_inputs)):
            self.example_inputs = Path(self.example_inputs)
        if self.format not in FORMAT_CHOICES:
            raise UsageError(f"format must be one of {', '.join(FORMAT_CHOICES)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "int8" and self.format in ("pt2", "aoti"):  # their dense ops compute in fp32
            raise UsageError(f"--dtype int8 writes torchscript or pickle artifacts, not {self.format}")
        if self.dtype == "bfloat16" and self.format in ("pt2", "aoti") and not _bf16_supported():
            raise UsageError(f"--dtype bfloat16 runs on lstmopt's native kernel on this CPU (no native bf16 in "
                             f"oneDNN), which writes torchscript or pickle artifacts, not {self.format}")
        if sum(x is not None and x != [] for x in (self.example_inputs, self.input_shape, self.inputs)) > 1:
            raise UsageError("give one of example inputs, an input shape or input specs (--input), not several")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise UsageError(f"the minimum speedup must be positive, got {self.min_speedup}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"{name} must be >= 0, got {value}")

    def fingerprint(self) -> str:
        """SHA-256 over everything but the input's own content that shapes the output: two runs with the same
        fingerprint and the same input produce equivalent artifacts (batch runs skip such jobs)."""
        import hashlib
        import json

        from lstmopt.environment import describe
        from lstmopt.artifacts.files import sha256_file

        settings = self.to_dict()
        settings.pop("trust")
        if isinstance(self.example_inputs, Path):
            settings["example_inputs"] = sha256_file(self.example_inputs) if self.example_inputs.is_file() else None
        env = describe()
        settings["versions"] = [env["lstmopt"], env["torch"]]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {
            "format": self.format, "dtype": self.dtype, "factory": self.factory,
            "factory_kwargs": self.factory_kwargs, "trust": self.trust, "state_dict_key": self.state_dict_key,
            "strip_prefix": self.strip_prefix,
            "example_inputs": str(self.example_inputs) if self.example_inputs else None,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "inputs": list(self.inputs) if self.inputs else None,
            "atol": self.atol, "rtol": self.rtol, "verify": self.verify, "autotune": self.autotune,
            "approx": self.approx,
            "benchmark": self.benchmark or self.min_speedup is not None, "min_speedup": self.min_speedup,
            "require_lstm": self.require_lstm, "seed": self.seed,
        }


@dataclass
class Report:
    """The outcome of one job; ``to_dict()`` is the JSON report (schema ``SCHEMA``)."""

    options: OptimizeOptions
    status: str = "running"
    exit_code: int = 0
    error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    input: dict = field(default_factory=dict)
    output: Optional[dict] = None
    artifact: Optional[dict] = None  # how it was made: {"method": "scripted" | "traced" | "pickled", "reason"}
    environment: dict = field(default_factory=dict)
    modules: list[dict] = field(default_factory=list)
    verification: Optional[dict] = None
    benchmark: Optional[dict] = None
    low_precision: Optional[dict] = None  # bf16, int8: the errors against fp32 and the tolerance derived (job/low_precision.py)
    timings: dict = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    exception: Optional[BaseException] = field(default=None, repr=False)  # for --debug tracebacks

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def fail(self, exc: LstmoptError) -> None:
        self.status = STATUS_BY_ERROR.get(type(exc).__name__, "error")
        self.exit_code = exc.exit_code
        self.error = one_line(exc, limit=2000)
        self.exception = exc

    def raise_for_status(self) -> None:
        """Raise the recorded failure (for Python callers that prefer exceptions)."""
        if not self.ok:
            from lstmopt import errors

            if self.exception is not None:
                raise self.exception
            cls = {v: k for k, v in STATUS_BY_ERROR.items()}.get(self.status, "LstmoptError")
            raise getattr(errors, cls, errors.LstmoptError)(self.error)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "lstmopt": __version__, "status": self.status, "exit_code": self.exit_code,
            "error": self.error, "warnings": self.warnings, "input": self.input, "output": self.output,
            "artifact": self.artifact,
            "options": self.options.to_dict(), "environment": self.environment, "modules": self.modules,
            "verification": self.verification, "benchmark": self.benchmark, "low_precision": self.low_precision,
            "timings": self.timings,
            "started": self.started, "finished": self.finished,
        }


def _bf16_supported() -> bool:
    from lstmopt.modules.packs import bf16_supported  # torch, only when asked

    return bf16_supported()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _Steps:
    """Times each step into the report and tells an observer (a progress display) which one runs."""

    def __init__(self, report: Report, on_step: Optional[Callable[[str], None]]):
        self.report, self.on_step = report, on_step

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        if self.on_step is not None:
            self.on_step(self.name)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.report.timings[f"{self.name}_s"] = round(time.perf_counter() - self.start, 3)


def optimize_file(options: OptimizeOptions, *, on_step: Optional[Callable[[str], None]] = None) -> Report:
    """Run one optimization job (see the module docstring); never raises for the user's errors, which the
    report carries with their exit code.

    Args:
        options: the job, as ``lstmopt optimize`` or a batch config gives it.
        on_step: called with each step's name ("load", "optimize", "autotune", "write", "verify", "benchmark").

    Example:
        >>> report = optimize_file(OptimizeOptions(input="model.pt", output="model.ts.pt",
        ...                                        factory="mymodels:build", input_shape=(8, 100, 40)))
        >>> report.exit_code, report.verification["max_abs_error"]
        (0, 0.0)
    """
    from lstmopt.environment import describe

    report = Report(options=options, started=_now(), environment=describe())
    try:
        _run(options, report, _Steps(report, on_step))
        report.status = "ok"
        # What lets a batch skip this output later: a record only lstmopt writes (lstmopt.artifacts.ledger)
        ledger.record(options.output, sha256=report.output["sha256"], source_sha256=report.input.get("sha256"),
                      options_sha256=options.fingerprint())
    except LstmoptError as exc:
        report.fail(exc)
    except Exception as exc:  # a bug in lstmopt or below it: the report still says what happened (--report, CI)
        report.status, report.exit_code, report.exception = "error", 1, exc
        report.error = f"internal error: {type(exc).__name__}: {one_line(exc)}"
    finally:
        report.finished = _now()
    return report


def _run(options: OptimizeOptions, report: Report, step: _Steps) -> None:
    from lstmopt.artifacts.files import atomic_path, check_output_path, remove_stale_temp_files, sha256_file
    from lstmopt.job.route import Attempt, formats_for, write_verified

    report.input = {"path": str(options.input), "factory": options.factory,
                    "factory_kwargs": options.factory_kwargs or None}
    check_output_path(options.output, force=options.force, inputs=tuple(
        Path(p) for p in (options.input, options.example_inputs) if p is not None and Path(p).exists()))
    remove_stale_temp_files(options.output)  # what a run killed with SIGKILL left beside it
    for wanted, what in ((options.min_speedup is not None, "a minimum speedup"), (options.autotune, "autotune")):
        if wanted and options.example_inputs is None and options.input_shape is None and not options.inputs:
            raise UsageError(f"{what} needs inputs to time: pass --example-inputs, --input-shape or --input")

    loaded, samples, imported_before = _load(options, report, step)
    optimized, decisions, measured = _optimize(options, report, step, loaded, samples)
    if not samples:
        report.warnings.append("no example inputs or input shape: only each LSTM was checked on its own "
                               "inputs, not the model as a whole" + (", and nothing was benchmarked"
                                                                     if options.benchmark else ""))
    metadata = _metadata(options, report, loaded, imported_before)
    attempt = Attempt(optimized=optimized, original=loaded.model, decisions=decisions, samples=samples,
                      metadata=metadata, dtype=options.dtype, verify=options.verify,
                      measured_tolerance=measured.tolerance if measured is not None else None,
                      atol=options.atol, rtol=options.rtol, seed=options.seed)
    with atomic_path(options.output) as tmp:
        try:
            written = write_verified(attempt, tmp, formats_for(options.format, options.dtype), step=step,
                                     requested=options.format)
        except LstmoptError as exc:
            if getattr(exc, "verification", None) is not None:
                report.verification = exc.verification.to_dict()
            raise
        report.artifact = {**written.how, "format": written.format, "requested_format": options.format,
                           "blockers": [{"format": f, "reason": why} for f, why in written.blockers]}
        report.modules = [d.to_dict() for d in written.decisions]
        report.warnings.extend(written.warnings)
        if written.verification is not None:
            report.verification = written.verification.to_dict()
        if (options.benchmark or options.min_speedup is not None) and samples:
            _benchmark(options, report, step, loaded.model, tmp, written, samples)
        report.output = {"path": str(options.output), "format": written.format, "sha256": sha256_file(tmp),
                         "bytes": tmp.stat().st_size}


def _load(options: OptimizeOptions, report: Report, step: _Steps):
    """The model, its samples (checked to be deterministic) and the modules imported before it was loaded."""
    from lstmopt.artifacts.loading import load_model
    from lstmopt.job.samples import samples_for
    from lstmopt.job.verification import check_deterministic

    with step("load"):
        imported_before = set(sys.modules)
        loaded = load_model(options.input, factory=options.factory, factory_kwargs=options.factory_kwargs,
                            trust=options.trust, state_dict_key=options.state_dict_key,
                            strip_prefix=options.strip_prefix)
        report.input.update(sha256=loaded.sha256, format=loaded.format, state_dict_key=loaded.state_dict_key,
                            stripped_prefix=loaded.stripped_prefix)
        samples = samples_for(options.example_inputs, options.input_shape, options.inputs)
        if options.verify:
            check_deterministic(loaded.model.eval(), samples, options.seed,
                                from_shape=options.input_shape is not None or bool(options.inputs))
    return loaded, samples, imported_before


def _optimize(options: OptimizeOptions, report: Report, step: _Steps, loaded, samples):
    """The optimized model, the decisions (with autotune's kernels and low precision's errors), and the
    errors measured against fp32 (bf16, int8; None otherwise)."""
    import torch

    from lstmopt.rewrite.autotune import autotune
    from lstmopt.rewrite.swap import optimize, plan, with_kernels

    with step("optimize"):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[options.dtype]
        exact = not options.approx  # the CLI's --approx, named as the rewrite names it from here down
        decisions = plan(loaded.model, dtype=dtype, exact=exact)
        report.modules = [d.to_dict() for d in decisions]
        if not any(d.packed for d in decisions):
            why = (f"the model has no {RECURRENT_CLASSES}" if not decisions
                   else "no module can be packed: " + "; ".join(f"{d.name or '<model>'}: {d.reason}"
                                                                for d in decisions))
            if options.require_lstm or options.min_speedup is not None:
                raise NothingToOptimizeError(f"nothing to optimize: {why}")
            report.warnings.append(f"nothing was optimized ({why}); the output is the model as loaded")
        optimized = optimize(loaded.model, dtype=dtype, exact=exact)
    if options.autotune and any(d.packed for d in decisions):
        with step("autotune"):
            autotune(optimized, samples, exact=exact)
            decisions = with_kernels(decisions, optimized, dtype=dtype)
            report.modules = [d.to_dict() for d in decisions]
    measured = None
    # Numerics that change by design: low precision asked for, and torch.ao's quantized modules (whose own
    # numerics no other kernel reproduces) turned into lstmopt's
    from_quantized = [d.name for d in decisions if d.packed and d.dtype in QUANTIZED_DTYPES]
    if (options.dtype != "float32" and any(d.packed for d in decisions)) or from_quantized:
        from lstmopt.job.low_precision import low_precision_names, measure

        with step("accuracy"):
            names = list(dict.fromkeys(low_precision_names(optimized) + from_quantized))
            measured = measure(loaded.model, optimized, samples, names)
        if not measured.lstms:  # nothing computes in low precision (a GRU under --approx, say): the usual rules
            measured = None
        else:
            decisions = [replace(d, error_vs_fp32=measured.lstms[d.name]["max_abs_error"],
                                 error_inputs=measured.lstms[d.name]["inputs"]) if d.name in measured.lstms else d
                         for d in decisions]
            report.modules = [d.to_dict() for d in decisions]
            report.low_precision = measured.to_dict()
    return optimized, decisions, measured


def _metadata(options: OptimizeOptions, report: Report, loaded, imported_before: set) -> dict:
    """The artifact's ``lstmopt.json`` record (``save_artifact`` adds how it was made)."""
    return {
        "schema": "lstmopt.artifact/1", "lstmopt": report.environment["lstmopt"],
        "torch": report.environment["torch"], "dtype": options.dtype,
        "source": dict(report.input), "modules": report.modules, "created": _now(),
        "options": options.to_dict(), "options_sha256": options.fingerprint(), "low_precision": report.low_precision,
        "user_code": user_code(imported_before, options.factory),
    }


def _benchmark(options: OptimizeOptions, report: Report, step: _Steps, original, path: Path, written,
               samples: list) -> None:
    """Time the written artifact against the original, where it runs any of lstmopt's kernels: a speedup of
    an artifact that holds no optimization would be TorchScript's over Python, not lstmopt's."""
    from lstmopt.job.benchmarking import compare_latency, load_written, per_lstm_latency, slower_warning
    from lstmopt.job.holdings import runs_lstmopt_kernels

    if not any(runs_lstmopt_kernels(d) for d in written.decisions):
        report.warnings.append("nothing in the artifact runs lstmopt's kernels, so nothing was benchmarked")
        if options.min_speedup is not None:
            raise NothingToOptimizeError("nothing to optimize: no module of the artifact runs lstmopt's kernels, so "
                                         "no speedup can reach --min-speedup")
        return
    traced_as_ops = set(written.how.get("lstms_traced_as_ops", ()))
    lstms = [d.name for d in written.decisions if d.packed and d.name not in traced_as_ops]
    with step("benchmark"):
        reloaded = load_written(path, written.format)
        bench = compare_latency(original, reloaded, samples)
        report.benchmark = bench.to_dict()
        # Verdicts only where the whole interval supports them: a busy machine widens it.
        slower = [case for case in bench.cases if case.speedup_high < 1.0]
        if slower:
            timed = per_lstm_latency(original, reloaded, lstms, samples)
            report.benchmark["lstms"] = [lstm.to_dict() for lstm in timed]
            report.warnings.append(slower_warning(slower, len(bench.cases), timed, written.decisions))
        low, high = bench.speedup_range
        measured = (f"speedup {bench.speedup:.2f}x (95% interval {low:.2f}-{high:.2f}x, geometric mean "
                    f"over {len(bench.cases)} inputs)")
        if not bench.stable:
            report.warnings.append(f"timings did not settle within {4 * bench.rounds} rounds (a busy "
                                   f"machine?): {measured}")
        if options.min_speedup is not None and high < options.min_speedup:
            raise SpeedupError(f"{measured} is below the required {options.min_speedup:g}x")
        if options.min_speedup is not None and low < options.min_speedup:
            report.warnings.append(f"{measured}: the noise cannot tell whether it is below the required "
                                   f"{options.min_speedup:g}x, so --min-speedup does not fail it")
