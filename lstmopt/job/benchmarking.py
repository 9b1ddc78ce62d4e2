"""Whole-model latency: original vs optimized on the same inputs, medians of interleaved rounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from lstmopt.job.samples import Sample, call_input, describe, recorded_calls
from lstmopt.rewrite.timing import compare, interleaved_medians

__all__ = ["Benchmark", "LatencyCase", "compare_latency", "load_written", "per_lstm_latency", "slower_warning"]


class _OriginalAgainstOptimized:
    """A timing of the original (``original_ms``) against the optimized model (``optimized_ms``)."""

    @property
    def speedup(self) -> float:
        return self.original_ms / self.optimized_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": round(self.speedup, 4)}


@dataclass
class LatencyCase(_OriginalAgainstOptimized):
    input: str
    original_ms: float
    optimized_ms: float
    # The ~95% interval of the median of per-round speedups (the two models timed side by side each round)
    speedup_low: float = float("nan")
    speedup_high: float = float("nan")
    rounds: int = 0
    # The median of the per-round speedups, which the interval is about (the ratio of the two median
    # times can fall outside it on a noisy machine)
    speedup_median: float = float("nan")

    @property
    def speedup(self) -> float:
        if math.isfinite(self.speedup_median):
            return self.speedup_median
        return self.original_ms / self.optimized_ms


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


@dataclass
class Benchmark:
    rounds: int
    threads: int
    cases: list[LatencyCase] = field(default_factory=list)
    stable: bool = True  # every case's interval got narrower than the target within the round budget

    @property
    def speedup(self) -> float:
        """Geometric mean of the per-input speedups."""
        return _geomean(c.speedup for c in self.cases)

    @property
    def speedup_range(self) -> tuple[float, float]:
        """The geometric means of the cases' interval ends: the speedup the noise allows at worst and best."""
        return _geomean(c.speedup_low for c in self.cases), _geomean(c.speedup_high for c in self.cases)

    def to_dict(self) -> dict:
        low, high = self.speedup_range
        return {"rounds": self.rounds, "threads": self.threads, "speedup": round(self.speedup, 4),
                "speedup_low": round(low, 4), "speedup_high": round(high, 4), "stable": self.stable,
                "cases": [c.to_dict() for c in self.cases]}


def compare_latency(
    original: torch.nn.Module,
    optimized: torch.nn.Module,
    samples: Sequence[Sample],
    *,
    rounds: int = 15,
    round_s: float = 0.02,
    on_case: Optional[Callable[[int, LatencyCase], None]] = None,
) -> Benchmark:
    """Median latency per call of both models on each sample, timed side by side under ``no_grad``, with
    rounds added (up to 4 x ``rounds``) until each speedup's interval is within 10% of it."""
    result = Benchmark(rounds=rounds, threads=torch.get_num_threads())
    with torch.no_grad():
        for i, args in enumerate(samples):
            measured = compare({"original": lambda: original(*args), "optimized": lambda: optimized(*args)},
                               baseline="optimized", rounds=rounds, round_s=round_s)
            speedup = measured.ratios["original"]  # original's time over optimized's, round by round
            case = LatencyCase(describe(args), measured.medians["original"] * 1e3,
                               measured.medians["optimized"] * 1e3, speedup.low, speedup.high, measured.rounds,
                               speedup.median)
            result.cases.append(case)
            result.stable = result.stable and measured.stable
            if on_case is not None:
                on_case(i, case)
    return result


@dataclass
class LstmLatency(_OriginalAgainstOptimized):
    """One LSTM of the model timed on its own, original against optimized, on the calls the samples give it."""

    name: str
    inputs: str  # "tensors", "PackedSequences" or both
    original_ms: float  # per pass over the samples
    optimized_ms: float


def _submodule(model, name: str):
    for part in filter(None, name.split(".")):  # ScriptModules have no get_submodule
        model = getattr(model, part)
    return model


def _entry_point(module, input):
    """How to call an LSTM of a loaded artifact: a scripted nn.LSTM's forward is overloaded."""
    from torch.nn.utils.rnn import PackedSequence

    if isinstance(module, torch.jit.ScriptModule) and hasattr(module, "forward__0"):
        return module.forward__1 if isinstance(input, PackedSequence) else module.forward__0
    return module


def per_lstm_latency(original: torch.nn.Module, optimized: torch.nn.Module, names: Sequence[str],
                     samples: Sequence[Sample], *, rounds: int = 9, round_s: float = 0.01) -> list[LstmLatency]:
    """Time each named LSTM of ``original`` against the same module of ``optimized`` (a Python model or a
    loaded artifact) on the calls the samples make of it: what a slower artifact is to be blamed on."""
    from torch.nn.utils.rnn import PackedSequence

    results = []
    with torch.no_grad():
        for name, calls in recorded_calls(original, names, samples).items():
            if not calls:
                continue
            stock = original.get_submodule(name)
            target = _submodule(optimized, name)
            # A model may pass the input by keyword (darts: lstm(input=x, hx=h)): calls keep their keywords
            medians = interleaved_medians(
                {"original": lambda: [stock(*a, **k) for a, k in calls],
                 "optimized": lambda: [_entry_point(target, call_input(a, k))(*a, **k) for a, k in calls]},
                rounds=rounds, round_s=round_s)
            kinds = {"PackedSequences" if isinstance(call_input(a, k), PackedSequence) else "tensors" for a, k in calls}
            results.append(LstmLatency(name, " and ".join(sorted(kinds)), medians["original"] * 1e3,
                                       medians["optimized"] * 1e3))
    return results


def slower_warning(slower: list, total: int, lstms: list, decisions: list) -> str:
    """Says, in words, that the artifact ran slower than the original, and which LSTMs it is down to."""
    worst = min(slower, key=lambda case: case.speedup)
    text = (f"the artifact ran slower than the original on {len(slower)} of {total} inputs beyond the timing "
            f"noise (worst {worst.speedup:.2f}x, 95% interval {worst.speedup_low:.2f}-{worst.speedup_high:.2f}x)")
    blamed = sorted((lstm for lstm in lstms if lstm.speedup < 1.0), key=lambda lstm: lstm.speedup)
    reasons = {d.name: d for d in decisions}
    if blamed:
        parts = []
        for lstm in blamed:
            decision = reasons.get(lstm.name)
            why = ""
            if "PackedSequences" in lstm.inputs and decision is not None and decision.sequence_kernel == "stock":
                why = ": PackedSequences take nn.LSTM's own path (--autotune --approx may pick the faster kernel)"
            elif decision is not None and decision.kernel == "stock":
                why = ": autotune kept nn.LSTM for its inputs"
            parts.append(f"{lstm.name or '<model>'} {lstm.speedup:.2f}x on its {lstm.inputs}{why}")
        text += "; LSTMs slower than the original's: " + "; ".join(parts)
    elif lstms:
        text += "; no LSTM is slower on its own (" + ", ".join(
            f"{lstm.name or '<model>'} {lstm.speedup:.2f}x" for lstm in lstms) + "): the difference lies elsewhere"
    return text


def load_written(path: Path, format: str) -> Any:
    """An artifact lstmopt just wrote, loaded as a deployment loads it (a program as a callable module)."""
    if format == "torchscript":
        from lstmopt.artifacts.scripting import quiet_torchscript

        with quiet_torchscript():
            return torch.jit.load(str(path), map_location="cpu")
    if format in ("pt2", "aoti"):
        from lstmopt.job.verify_child import load_program

        return load_program(path, format)
    return torch.load(path, map_location="cpu", weights_only=False)  # we just wrote it
