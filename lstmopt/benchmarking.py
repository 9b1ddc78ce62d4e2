"""Whole-model latency: original vs optimized on the same inputs, medians of interleaved rounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .samples import Sample, describe
from .timing import interleaved_medians

__all__ = ["Benchmark", "LatencyCase", "compare_latency"]


@dataclass
class LatencyCase:
    input: str
    original_ms: float
    optimized_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.optimized_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": round(self.speedup, 4)}


@dataclass
class Benchmark:
    rounds: int
    threads: int
    cases: list[LatencyCase] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """Geometric mean of the per-input speedups."""
        if not self.cases:
            return float("nan")
        return math.exp(sum(math.log(c.speedup) for c in self.cases) / len(self.cases))

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "threads": self.threads, "speedup": round(self.speedup, 4),
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
    """Median latency per call of both models on each sample, timed side by side under ``no_grad``."""
    result = Benchmark(rounds=rounds, threads=torch.get_num_threads())
    with torch.no_grad():
        for i, args in enumerate(samples):
            medians = interleaved_medians(
                {"original": lambda: original(*args), "optimized": lambda: optimized(*args)},
                rounds=rounds, round_s=round_s,
            )
            case = LatencyCase(describe(args), medians["original"] * 1e3, medians["optimized"] * 1e3)
            result.cases.append(case)
            if on_case is not None:
                on_case(i, case)
    return result
