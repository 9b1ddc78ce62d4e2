"""Latency measurement shared by autotune, ``--bench``, the CLI's ``bench`` and ``benchmarks/``.

Timing variants side by side, round after round, makes a noisy shared machine slow them all alike, so
their ratios stay meaningful even when absolute times drift. ``compare`` goes further, for decisions made
on the numbers (a kernel chosen, a build gated by ``--min-speedup``): it pairs the variants' times round
by round, gives each ratio to the baseline with a distribution-free 95% interval of its median, and runs
more rounds until the intervals are narrow or the budget is spent; a decision is taken only where the
whole interval supports it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

__all__ = ["Comparison", "Ratio", "compare", "interleaved_medians", "median_interval"]


def _warm(fn: Callable[[], object], warm_s: float) -> None:
    """Run ``fn`` for ``warm_s``: after another variant ran, a thread pool's sleeping threads can take
    milliseconds to wake on a virtual machine, and caches hold the other variant's data."""
    deadline = time.perf_counter() + warm_s
    fn()
    while time.perf_counter() < deadline:
        fn()


def _calls_per_round(fn: Callable[[], object], target_s: float) -> int:
    _warm(fn, target_s)  # first-call allocations, lazy initialisation
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(10_000, int(target_s / once)))


def interleaved_samples(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 15,
    round_s: float = 0.02,
    warm_s: float = 0.005,
    settle_s: float = 0.0,
    on_round: Optional[Callable[[int], None]] = None,
    counts: Optional[dict[str, int]] = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``rounds`` interleaved rounds of ~``round_s``, each
    function warmed up for ``warm_s`` before its timed block. ``settle_s``: a pause before each block,
    for functions whose thread pools keep spinning after a call (ONNX Runtime's do by default), so that
    one does not time another while its threads still hold the CPU."""
    counts = counts or {name: _calls_per_round(fn, round_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
            _warm(fn, warm_s)
            n = counts[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
        if on_round is not None:
            on_round(r)
    return samples


def interleaved_medians(fns: Mapping[str, Callable[[], object]], **kwargs) -> dict[str, float]:
    """Median seconds per call of each function over interleaved rounds (``interleaved_samples``)."""
    return {name: statistics.median(values) for name, values in interleaved_samples(fns, **kwargs).items()}


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free ~95% confidence interval for it (order
    statistics: ranks n/2 -/+ 0.98 sqrt(n)). With 9 values or fewer it is the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - half) - 1)
    high = min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(ordered), ordered[low], ordered[high]


@dataclass(frozen=True)
class Ratio:
    """A variant's time over the baseline's (per round, the two timed side by side): the median of the
    per-round ratios and its ~95% interval. ``high < 1``: faster than the baseline beyond the noise."""

    median: float
    low: float
    high: float

    @property
    def width(self) -> float:
        """The interval's width relative to the median."""
        return (self.high - self.low) / self.median if self.median > 0 else math.inf

    def inverse(self) -> "Ratio":
        """The baseline's time over the variant's (a speedup, from a ratio of times)."""
        return Ratio(1 / self.median, 1 / self.high, 1 / self.low)

    def to_dict(self) -> dict:
        return {"median": round(self.median, 4), "low": round(self.low, 4), "high": round(self.high, 4)}


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` measured: median seconds per call, each variant's ``Ratio`` to the baseline, the
    rounds run, and whether every interval got narrower than the target width."""

    medians: dict[str, float]
    ratios: dict[str, Ratio]
    rounds: int
    stable: bool


def compare(
    fns: Mapping[str, Callable[[], object]],
    baseline: str,
    *,
    rounds: int = 15,
    max_rounds: Optional[int] = None,
    width: float = 0.1,
    round_s: float = 0.02,
    **kwargs,
) -> Comparison:
    """Time ``fns`` in interleaved rounds and compare each with ``fns[baseline]``, adding rounds (up to
    ``max_rounds``, by default 4 x ``rounds``) until every ratio's interval is narrower than ``width``
    (relative to its median).

    Example:
        >>> result = compare({"eager": lambda: lstm(x), "packed": lambda: packed(x)}, baseline="eager")
        >>> result.ratios["packed"].high < 1  # faster beyond the noise
        True
    """
    max_rounds = max(rounds, max_rounds if max_rounds is not None else 4 * rounds)
    counts = {name: _calls_per_round(fn, round_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    batch = rounds
    while True:
        more = interleaved_samples(fns, rounds=batch, round_s=round_s, counts=counts, **kwargs)
        for name, values in more.items():
            samples[name] += values
        ratios = {name: Ratio(*median_interval([t / b for t, b in zip(values, samples[baseline])]))
                  for name, values in samples.items() if name != baseline}
        stable = all(ratio.width <= width for ratio in ratios.values())
        done = len(samples[baseline])
        if stable or done >= max_rounds:
            medians = {name: statistics.median(values) for name, values in samples.items()}
            return Comparison(medians, ratios, done, stable)
        batch = min(max(rounds // 2, 3), max_rounds - done)
