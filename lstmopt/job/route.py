"""Which artifact a job writes: the formats it tries, each written and verified in a fresh process.

``--format auto`` (the default) tries TorchScript (scripted, else traced), then a torch.export program (pt2),
then a pickle, and keeps the first that verifies, saying which it wrote instead of the first and why (the
blocker, by file and line where TorchScript names one). A format the user names is the only one written:
where it cannot hold the model, the job fails with its blocker, and says which other format would.

An attempt fails where the format cannot hold the model (``UsageError`` from writing: not scriptable nor
traceable, not exportable) or where the written artifact does not verify (``VerificationError``: a trace
that specialized to its example, a pickle whose loading undoes the optimization). Anything else (the
original model failing on its inputs, say) is no matter of format and ends the job at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from lstmopt.choices import AUTO, AUTO_ROUTE
from lstmopt.errors import LstmoptError, UsageError, VerificationError

__all__ = ["Attempt", "Written", "formats_for", "write_verified"]


@dataclass
class Written:
    """The artifact that verified: its format, how it was made, the decisions as it runs them."""

    format: str
    how: dict
    decisions: list
    verification: Optional[object]
    warnings: list = field(default_factory=list)
    blockers: list = field(default_factory=list)  # (format, why) of the formats tried before it


@dataclass
class Attempt:
    """What every format's attempt shares: the models, the decisions, the samples, how to verify."""

    optimized: object  # the optimized model
    original: object
    decisions: list
    samples: Sequence
    metadata: dict
    dtype: str
    verify: bool = True
    measured_tolerance: Optional[tuple] = None  # bf16, int8: derived from the errors measured against fp32
    atol: Optional[float] = None  # the user's, over any default
    rtol: Optional[float] = None
    seed: Optional[int] = None

    def tolerance(self, exact: bool) -> tuple[float, float, bool]:
        """(atol, rtol, whether approximate fp32 kernels are judged by their contract against float64)."""
        from lstmopt.job.verification import default_tolerance

        atol, rtol = self.measured_tolerance or default_tolerance(self.dtype, exact=exact)
        float64 = (not exact and self.dtype == "float32" and self.measured_tolerance is None and self.atol is None
                   and self.rtol is None)
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol, float64)


def formats_for(requested: str, dtype: str) -> tuple[str, ...]:
    """The formats a job tries, in order: the one requested, or the automatic route for its dtype (int8 and
    the native kernel's bf16 compute in fp32 in a program, so they take no program)."""
    if requested != AUTO:
        return (requested,)
    from lstmopt.modules.packs import bf16_supported

    programs_serve = dtype == "float32" or (dtype == "bfloat16" and bf16_supported())
    return tuple(f for f in AUTO_ROUTE if programs_serve or f not in ("pt2", "aoti"))


def write_verified(attempt: Attempt, path: Path, formats: Sequence[str], *, step, requested: str) -> Written:
    """Write ``attempt``'s model to ``path`` in the first of ``formats`` that verifies (see the module docstring).
    The automatic route passes over a format that would lose optimization the model has on its inputs (a trace
    records an LSTM fed PackedSequences as nn.LSTM's own op), and comes back to the first such one where no
    later format holds the model at all."""
    blockers: list = []
    first_error: Optional[LstmoptError] = None
    received = _received(attempt) if requested == AUTO else None
    lossy = None
    for fmt in formats:
        try:
            return _attempt(attempt, path, fmt, step, blockers, received=received)
        except _Blocked as blocked:
            blockers.append((fmt, _without_advice(str(blocked.error))))
            first_error = first_error or blocked.error
            lossy = lossy or (fmt if blocked.loses_optimization else None)
    if lossy is not None:
        kept = [(fmt, why) for fmt, why in blockers if fmt != lossy]
        return _attempt(attempt, path, lossy, step, kept, received=None)
    assert first_error is not None
    if requested != AUTO:
        works = _another_that_works(attempt, path, requested, step)
        error = type(first_error)(f"{first_error}" + (f"; --format {works} writes a verified artifact of this model"
                                                      if works else ""))
    else:
        error = type(first_error)("no format holds this model: " + "; ".join(f"{fmt}: {why}" for fmt, why in blockers))
    error.verification = getattr(first_error, "verification", None)
    raise error from first_error


# A writer's own advice ("; write it with --format pt2 or pickle, ...") says what the route does anyway.
_ADVICE = re.compile(r"; (?:or )?write it with --format [^;]*$")


def _without_advice(message: str) -> str:
    return _ADVICE.sub("", message)


class _Blocked(Exception):
    """This format cannot hold the model (or, ``loses_optimization``, not without losing some): ``error`` says why."""

    def __init__(self, error: LstmoptError, loses_optimization: bool = False):
        super().__init__(str(error))
        self.error, self.loses_optimization = error, loses_optimization


def _received(attempt: Attempt) -> dict:
    """Per module of the decisions, the kinds of input ("tensor", "sequence") it received on the samples; both
    where there are none to run."""
    from torch.nn.utils.rnn import PackedSequence

    from lstmopt.job.samples import call_input, recorded_calls

    names = [d.name for d in attempt.decisions if d.packed]
    if not attempt.samples:
        return {name: {"tensor", "sequence"} for name in names}
    calls = recorded_calls(attempt.optimized, names, attempt.samples)
    inputs = {name: [call_input(*call) for call in calls[name]] for name in names}
    return {name: {"sequence" if isinstance(x, PackedSequence) else "tensor" for x in inputs[name] if x is not None}
            for name in names}


def _serves(decision, kinds: set) -> bool:
    """Whether ``decision``'s module serves any of the input ``kinds`` it receives with one of lstmopt's kernels."""
    return decision.packed and any((decision.kernel if kind == "tensor" else decision.sequence_kernel)
                                   not in (None, "stock") for kind in kinds)


def _attempt(attempt: Attempt, path: Path, fmt: str, step, blockers: list, *, received: Optional[dict]) -> Written:
    """Write and verify ``fmt``; with ``received`` (the automatic route), an artifact that would lose optimization
    the model has on its inputs is blocked too, as lossy."""
    try:
        written = _write(attempt, path, fmt, step)
    except UsageError as exc:  # the format cannot hold the model
        raise _Blocked(exc) from exc
    if received is not None:
        before = {d.name: d for d in attempt.decisions}
        lost = [d for d in written.decisions if d.name in received and _serves(before[d.name], received[d.name])
                and not _serves(d, received[d.name])]
        if lost:
            raise _Blocked(UsageError(f"{lost[0].name or '<model>'} would lose its optimization ({lost[0].reason})"),
                           loses_optimization=True)
    if attempt.verify:
        try:
            written.verification = _verify(attempt, path, written, step)
        except VerificationError as exc:  # its artifact does not compute, or hold, what the model does
            raise _Blocked(exc) from exc
    written.blockers = list(blockers)
    if blockers:
        written.warnings.insert(0, f"wrote {fmt}, not {blockers[0][0]}: " + "; ".join(
            f"{name}: {why}" for name, why in blockers))
    return written


def _another_that_works(attempt: Attempt, path: Path, requested: str, step) -> Optional[str]:
    """The first other format of the automatic route that writes a verified artifact (in ``path``, which the
    failing job removes), for the error's advice."""
    for fmt in formats_for(AUTO, attempt.dtype):
        if fmt == requested:
            continue
        try:
            _attempt(attempt, path, fmt, step, [], received=None)
            return fmt
        except _Blocked:
            continue
    return None


def _write(attempt: Attempt, path: Path, fmt: str, step) -> Written:
    from lstmopt.artifacts.program import program_decisions
    from lstmopt.artifacts.tracing import tracing_caveat
    from lstmopt.artifacts.writing import TRACED_AS_OP, native_kernel_note, program_note, save_artifact

    decisions = attempt.decisions
    warnings = []
    with step("write"):
        how = save_artifact(attempt.optimized, path, format=fmt, metadata={**attempt.metadata, "format": fmt},
                            samples=attempt.samples)
    traced_as_ops = set(how.get("lstms_traced_as_ops", ()))
    if traced_as_ops:  # no longer a module of its own in the archive: it runs none of lstmopt's kernels
        decisions = [replace(d, **TRACED_AS_OP) if d.name in traced_as_ops else d for d in decisions]
    if fmt in ("pt2", "aoti"):
        decisions = program_decisions(decisions, [tuple(call) for call in how["program_calls"]])
    if how["method"] == "traced":
        warnings.append(tracing_caveat(len([d for d in decisions if d.packed and d.name not in traced_as_ops])))
    if how.get("lstmopt_ops"):
        warnings.append(program_note(fmt))
    elif how["native_kernel"]:
        warnings.append(native_kernel_note(how["native_kernel"], fmt))
    if how.get("left_out"):
        warnings.append(f"scripted without {', '.join(how['left_out'])}, which the model's forward did not call on "
                        "the example input (their own forward cannot run in the artifact)")
    return Written(fmt, how, decisions, None, warnings)


def _verify(attempt: Attempt, path: Path, written: Written, step):
    from lstmopt.job import holdings
    from lstmopt.job.verification import verify_artifact

    how, decisions = written.how, written.decisions
    program = written.format in ("pt2", "aoti")
    atol, rtol, float64 = attempt.tolerance(exact=all(d.exact for d in decisions))
    traced_as_ops = set(how.get("lstms_traced_as_ops", ()))
    with step("verify"):
        verification = verify_artifact(
            attempt.original, path, format=written.format, samples=attempt.samples,
            lstm_names=[d.name for d in attempt.decisions if d.packed and d.name not in traced_as_ops],
            atol=atol, rtol=rtol, artifact_prefix=how.get("module_prefix", ""),
            native_kernel=bool(how["native_kernel"] or how.get("lstmopt_ops")), seed=attempt.seed,
            float64_reference=float64,
            expected_modules=None if program else holdings.expected_modules(decisions),
            expected_ops=holdings.expected_ops(decisions) if program else (),
            optimized=attempt.optimized, pytree_types=[tuple(t) for t in how.get("pytree_types", ())],
        )
    if not verification.ok:
        summary = verification.failure_summary()
        if how["method"] == "traced" and not verification.holding_problems:
            summary += ("; the trace specialized to its example input (Python control flow, shapes used as numbers), "
                        f"and scripting it failed: {how['reason']}")
        error = VerificationError(summary)
        error.verification = verification  # for the report
        raise error
    return verification
