"""Verification: reload an artifact in a fresh process and compare it with the original model.

Two kinds of checks, each reported per output tensor with its max absolute and relative error:

- the whole model on sample inputs (the user's, or generated from a shape);
- every swapped LSTM on its own synthetic inputs (two sequence lengths, two batch sizes, with and
  without initial states), so an LSTM the samples never reach is still checked.

Both sides compute with the same settings that change numerics (intra-op threads above all: a matmul or
oneDNN split over another number of threads sums in another order): the child applies the parent's.
A TorchScript artifact whose LSTMs run the native kernel gets the native library, by path, in the child
(which cannot import lstmopt), as a deployment would with ``lstmopt.native.LOAD_LINE``.

The child starts isolated (``python -I``): nothing from the working directory or ``PYTHONPATH`` runs
in it. Only a pickle artifact, whose classes live in the user's code, gets the user's import paths, and
after the installed packages. It dies with its parent (``PR_SET_PDEATHSIG``).

A check passes when ``|optimized - original| <= atol + rtol * |original|`` everywhere (NaNs must match);
the fp32 default tolerance is zero (bit-identical); a bf16 or int8 artifact's is derived from the errors
measured against fp32 when it was made (``lstmopt.job.low_precision``: 4x the largest, absolute), or
``BF16_TOLERANCE`` where none were recorded. An fp32 artifact
with approximate kernels is held instead to their contract (``lstmopt.kernels.accuracy``): against the
original computed in float64 on the same inputs, its error is at most ``FACTOR`` times the fp32 original's
own, unless ``--atol``/``--rtol`` are given.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lstmopt.errors import UsageError, VerificationError, one_line
from lstmopt.job import fresh_process, holdings, verify_child
from lstmopt.job.samples import Sample, describe, lstm_cases
from lstmopt.kernels import accuracy

__all__ = ["APPROX_TOLERANCE", "BF16_TOLERANCE", "Check", "Verification", "check_deterministic", "default_tolerance",
           "verify_artifact"]

# bf16 keeps 8 significant bits. On the test models (speech encoder, tagger, forecaster, up to 100
# steps, random initial states) the largest error against fp32 was 4e-3; the default leaves 5x headroom.
BF16_TOLERANCE = (2e-2, 2e-2)


# For approximate kernels where the model cannot run in float64 (else the contract of kernels/accuracy.py
# judges), or when only one of --atol/--rtol is given: on PyTorch's initial weight scale they stay within it.
APPROX_TOLERANCE = (1e-6, 1e-6)


def default_tolerance(dtype: str, exact: bool = True) -> tuple[float, float]:
    """(atol, rtol): zero (bit-identical) for float32 with exact kernels, ``APPROX_TOLERANCE`` when a kernel
    is not bit-identical, ``BF16_TOLERANCE`` for bfloat16 (and for int8 where no measured errors say
    better: ``lstmopt.job.low_precision`` derives int8's from them)."""
    if dtype in ("bfloat16", "int8"):
        return BF16_TOLERANCE
    return (0.0, 0.0) if exact else APPROX_TOLERANCE


@dataclass
class Check:
    """One output tensor compared with the original's."""

    name: str
    shape: list
    max_abs_error: float
    max_rel_error: float
    ok: bool
    error: Optional[str] = None  # the optimized side raised, or shapes differ
    # Against the float64 reference, when that is the criterion (approximate kernels): the original's error,
    # the artifact's, and the bound the artifact's must stay within
    original_vs_float64: Optional[float] = None
    vs_float64: Optional[float] = None
    bound: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verification:
    atol: float
    rtol: float
    samples: list[str]  # shape descriptions of the model-level inputs
    model_checks: list[Check] = field(default_factory=list)
    lstm_checks: list[Check] = field(default_factory=list)
    numerics: dict = field(default_factory=dict)  # settings both sides computed with (threads, precisions)
    criterion: str = "tolerance"  # or "float64": the approximate-kernel contract (see the module docstring)
    # What the loaded artifact holds (lstmopt.job.holdings), and where it is not what the decisions say
    holdings: dict = field(default_factory=dict)
    holding_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.holding_problems and all(c.ok for c in self.model_checks + self.lstm_checks)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.model_checks + self.lstm_checks), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((c.max_rel_error for c in self.model_checks + self.lstm_checks), default=0.0)

    def failures(self) -> list[Check]:
        return [c for c in self.model_checks + self.lstm_checks if not c.ok]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "atol": self.atol, "rtol": self.rtol, "criterion": self.criterion,
            "factor": accuracy.FACTOR if self.criterion == "float64" else None, "samples": self.samples,
            "threads": self.numerics.get("threads"), "numerics": self.numerics,
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "model_outputs": [c.to_dict() for c in self.model_checks],
            "lstm_outputs": [c.to_dict() for c in self.lstm_checks],
            "artifact_holds": self.holdings, "artifact_problems": self.holding_problems,
        }

    def failure_summary(self) -> str:
        """One line: what the loaded artifact lacks, or how many outputs differ and the worst of them."""
        if self.holding_problems:
            return ("the artifact does not hold the optimization once loaded: " + "; ".join(self.holding_problems[:3])
                    + (f" (and {len(self.holding_problems) - 3} more)" if len(self.holding_problems) > 3 else ""))
        failed = self.failures()
        worst = max(failed, key=lambda c: c.max_abs_error if c.error is None else float("inf"))
        if self.criterion == "float64":
            worst = max(failed, key=lambda c: c.vs_float64 / c.bound if c.error is None and c.bound else float("inf"))
            detail = worst.error or (f"error {worst.vs_float64:.3g} against the float64 original, above the bound "
                                     f"{worst.bound:.3g} ({accuracy.FACTOR:g}x the fp32 original's own "
                                     f"{worst.original_vs_float64:.3g})")
            return (f"the optimized model is less accurate than its kernels promise in {len(failed)} output(s); "
                    f"worst: {worst.name}: {detail}")
        worst = max(failed, key=lambda c: c.max_abs_error if c.error is None else float("inf"))
        detail = worst.error or f"max abs error {worst.max_abs_error:.3g}, max rel error {worst.max_rel_error:.3g}"
        return (f"the optimized model differs from the original in {len(failed)} output(s); worst: {worst.name}: "
                f"{detail} (tolerance atol={self.atol:g}, rtol={self.rtol:g})")

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(self.failure_summary())


def compare(name: str, expected: Tensor, actual, atol: float, rtol: float) -> Check:
    if isinstance(actual, str):
        return Check(name, list(expected.shape), float("inf"), float("inf"), False, error=one_line(actual, 500))
    if actual.shape != expected.shape:
        return Check(name, list(expected.shape), float("inf"), float("inf"), False,
                     error=f"shape {list(actual.shape)} instead of {list(expected.shape)}")
    if not expected.is_floating_point():
        equal = torch.equal(expected, actual)
        return Check(name, list(expected.shape), 0.0 if equal else float("inf"),
                     0.0 if equal else float("inf"), equal)
    e, a = expected.detach().double(), actual.detach().double()
    both_nan = e.isnan() & a.isnan()
    diff = (a - e).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=float("inf"))
    scale = e.abs().masked_fill(both_nan, 0.0).nan_to_num(nan=0.0)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)
    ok = bool((diff <= atol + rtol * scale).all())
    return Check(name, list(expected.shape), float(diff.max()) if diff.numel() else 0.0,
                 float(rel.max()) if rel.numel() else 0.0, ok)


def against_float64(check: Check, expected: Tensor, actual, reference: Optional[Tensor]) -> Check:
    """``check`` judged by the approximate-kernel contract instead of its tolerance (where it compared
    tensors of floating type with a float64 ``reference`` of ``expected``)."""
    if reference is None or check.error is not None or isinstance(actual, str) or not expected.is_floating_point():
        return check
    measured = accuracy.accuracy(expected, actual, reference)
    return replace(check, ok=measured.ok, original_vs_float64=measured.eager_error, vs_float64=measured.error,
                   bound=measured.bound)


def _in_float64(obj):
    """Floating tensors of a (nested) argument in float64, the rest as they are."""
    if isinstance(obj, Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple such as PackedSequence
        return type(obj)(*(_in_float64(v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_in_float64(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _in_float64(v) for k, v in obj.items()}
    return obj


def verify_artifact(
    original: nn.Module,
    artifact: os.PathLike | str,
    *,
    format: str,
    samples: Sequence[Sample],
    lstm_names: Sequence[str],
    atol: float = 0.0,
    rtol: float = 0.0,
    artifact_prefix: str = "",
    native_kernel: bool = False,
    seed: Optional[int] = None,
    float64_reference: bool = False,
    expected_modules: Optional[dict] = None,
    expected_ops: Sequence[tuple[str, str]] = (),
    optimized: Optional[nn.Module] = None,
    pytree_types: Sequence[tuple[str, str, str]] = (),
    timeout: float = 900.0,
) -> Verification:
    """Load ``artifact`` in a fresh interpreter and compare it with ``original`` on ``samples`` and, for
    each name in ``lstm_names`` (modules of ``original``), on that LSTM's own synthetic inputs.
    ``native_kernel``: the artifact needs lstmopt's library (an LSTM on the native kernel, a program calling
    lstmopt's ops). ``seed``: the random generators are seeded with it before each compared model call, on
    both sides; a pt2 program is compared on ``samples`` only (it has no LSTM modules of its own).
    ``float64_reference``: judge by the approximate-kernel contract (a float64 copy of ``original`` as the
    reference) instead of ``atol``/``rtol``; where the model cannot run in float64, the tolerance judges.
    ``expected_modules`` (module formats) and ``expected_ops`` (programs): what the loaded artifact must hold
    (``lstmopt.job.holdings``; ``optimized``, the model written, names a cause where it does not);
    ``pytree_types``: the dataclasses a program's inputs and outputs hold, registered in the child as here."""
    original = original.eval()
    native_library = fresh_process.native_library() if native_kernel else None
    if format in ("pt2", "aoti"):
        lstm_names = []  # a program is one graph: it has no LSTM modules to call on their own inputs
    # The child computes with these very settings: results depend on the thread count in their last bits.
    numerics = verify_child.numerics_settings()
    result = Verification(atol=atol, rtol=rtol, samples=[describe(s) for s in samples], numerics=numerics)
    reference = _float64_copy(original) if float64_reference else None
    wanted = _Expected.of(original, reference, samples, lstm_names, artifact_prefix, seed)
    if reference is not None and all(r is not None for r in wanted.reference_samples + wanted.reference_lstms):
        result.criterion = "float64"

    expected = [artifact_prefix + name for name in expected_modules or {}]
    outputs = fresh_process.run_child(Path(artifact), format, list(samples), wanted.lstm_payload, numerics,
                                      native_library, seed, timeout, expected, list(pytree_types))
    result.holdings = outputs["inventory"]
    if expected_modules is not None or expected_ops:
        result.holding_problems = holdings.problems(expected_modules or {}, list(expected_ops), outputs["inventory"],
                                                    prefix=artifact_prefix, model=optimized)
    if outputs["numerics"] != numerics:
        raise VerificationError(f"the fresh process computed with other settings ({outputs['numerics']}) than the "
                                f"reference ({numerics}), so an exact comparison would mean nothing")
    wanted.judge(result, outputs)
    return result


@dataclass
class _Expected:
    """What the original computes, here, for the samples and for each LSTM's own cases (and with a float64
    reference, what that computes): the outputs the fresh process's must match."""

    samples: list = field(default_factory=list)
    reference_samples: list = field(default_factory=list)
    lstm_payload: list = field(default_factory=list)  # (the artifact's module name, its inputs) for the child
    lstms: list = field(default_factory=list)
    reference_lstms: list = field(default_factory=list)

    @classmethod
    def of(cls, original: nn.Module, reference: Optional[nn.Module], samples: Sequence[Sample],
           lstm_names: Sequence[str], artifact_prefix: str, seed: Optional[int]) -> "_Expected":
        wanted = cls()
        with torch.no_grad():
            for i, args in enumerate(samples):
                verify_child.seed_generators(seed)
                try:
                    wanted.samples.append(verify_child.flatten(original(*args)))
                except Exception as exc:
                    raise UsageError(f"the original model fails on example input {i} ({describe(args)}): "
                                     f"{type(exc).__name__}: {one_line(exc)}") from exc
                wanted.reference_samples.append(_reference_outputs(reference, args, seed))
            for name in lstm_names:
                lstm = original.get_submodule(name)
                for j, args in enumerate(lstm_cases(lstm)):
                    wanted.lstm_payload.append((artifact_prefix + name, args))
                    wanted.lstms.append((f"{name or '<model>'} case {j} {describe(args)}",
                                         verify_child.flatten(_below_own_forward(lstm)(*args))))
                    wanted.reference_lstms.append(_reference_outputs(
                        None if reference is None else _below_own_forward(reference.get_submodule(name)), args, None))
        return wanted

    def judge(self, result: Verification, outputs: dict) -> None:
        """Add to ``result`` a check per output tensor of the child's ``outputs`` (or one failed check for a call
        that raised, or that returned another number of tensors)."""
        for i, (expected, actual) in enumerate(zip(self.samples, outputs["samples"])):
            label = f"sample {i} {result.samples[i]}"
            if not isinstance(actual, str) and len(actual) != len(expected):
                actual = f"{len(actual)} output tensors instead of {len(expected)}"
            result.model_checks += _checks(result, label, expected, actual, self.reference_samples[i])
        for i, ((label, expected), actual) in enumerate(zip(self.lstms, outputs["lstms"])):
            result.lstm_checks += _checks(result, label, expected, actual, self.reference_lstms[i])


def _checks(result: Verification, label: str, expected: list, actual, references: Optional[list]) -> list[Check]:
    if isinstance(actual, str):  # the call failed in the child, or returned the wrong number of tensors
        return [Check(label, [], float("inf"), float("inf"), False, error=one_line(actual, 500))]
    return [_judged(result, f"{label} {name}", e, a, references, k)
            for k, ((name, e), a) in enumerate(zip(expected, actual))]


def _below_own_forward(module: nn.Module):
    """The module's LSTM itself: nn.LSTM's forward, under any subclass's own (which packing keeps)."""
    return functools.partial(nn.LSTM.forward, module) if isinstance(module, nn.LSTM) else module


def _judged(result: Verification, name: str, expected: Tensor, actual, references: Optional[list], k: int) -> Check:
    check = compare(name, expected, actual, result.atol, result.rtol)
    if result.criterion != "float64":
        return check
    reference = references[k][1] if k < len(references) and references[k][1].shape == expected.shape else None
    return against_float64(check, expected, actual, reference)


def _float64_copy(model: nn.Module) -> Optional[nn.Module]:
    """The model in float64 (a copy), or None where it cannot be copied or converted."""
    import copy

    try:
        return copy.deepcopy(model).double().eval()
    except Exception:
        return None


def _reference_outputs(reference: Optional[nn.Module], args, seed: Optional[int]) -> Optional[list]:
    """``reference``'s flattened outputs on ``args`` in float64, or None where it cannot compute them."""
    if reference is None:
        return None
    verify_child.seed_generators(seed)
    try:
        return verify_child.flatten(reference(*_in_float64(args)))
    except Exception:  # a model that insists on float32 somewhere: the tolerance judges instead
        return None


SHAPE_HINT = ("--input-shape B,T,F makes (batch, time, features) tensors for a model taking one; for other inputs, "
              "torch.save a list of argument tuples and pass --example-inputs")


def check_deterministic(model: nn.Module, samples: Sequence[Sample], seed: Optional[int], *,
                        from_shape: bool = False) -> None:
    """Run ``model`` twice on its first sample (each run preceded by seeding with ``seed``, when given).
    Raise ``UsageError`` when it fails on it (``from_shape``: the samples came from ``--input-shape``, which
    may not be what the model takes: say what to do), ``VerificationError`` when the runs differ: no artifact
    can be verified against a model that disagrees with itself, and the cause is the model's."""
    if not samples:
        return
    runs = []
    with torch.no_grad():
        for _ in range(2):
            verify_child.seed_generators(seed)
            try:
                runs.append(verify_child.flatten(model(*samples[0])))
            except Exception as exc:
                hint = f"; {SHAPE_HINT}" if from_shape else ""
                raise UsageError(f"the original model fails on example input 0 ({describe(samples[0])}): "
                                 f"{type(exc).__name__}: {one_line(exc)}{hint}") from exc
    # Bit for bit, NaNs where NaNs were: the model against itself, not the artifact's comparison.
    differing = []
    for (name, e), (_, a) in zip(*runs):
        if e.shape != a.shape or (not e.is_floating_point() and not torch.equal(e, a)):
            differing.append((name, float("inf")))
        elif e.is_floating_point() and accuracy.max_error(a, e.double()) > 0:
            differing.append((name, accuracy.max_error(a, e.double())))
    if not differing and len(runs[0]) == len(runs[1]):
        return
    worst = max(differing, key=lambda d: d[1]) if differing else None
    detail = f" ({worst[0]}: max abs difference {worst[1]:.3g})" if worst else ""
    if seed is None:
        raise VerificationError(
            f"the model is not deterministic in eval mode: two runs of the original on example input 0 differ{detail} "
            "(sampling, or dropout left on), so no artifact can be verified against it; if the randomness is "
            "intended, pass --seed N to seed the random generators with N before each compared call")
    raise VerificationError(
        f"the model is not deterministic even when its random generators are seeded with {seed} before each call: "
        f"two runs of the original on example input 0 differ{detail}; its randomness comes from elsewhere "
        "(another generator, threads, the clock)")
