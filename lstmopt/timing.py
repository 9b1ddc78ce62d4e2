"""Latency measurement shared by the CLI's ``bench`` and ``benchmarks/``: medians of interleaved rounds.

Timing variants side by side, round after round, makes a noisy shared machine slow them all alike, so
their ratios stay meaningful even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Optional

__all__ = ["interleaved_medians"]


def _calls_per_round(fn: Callable[[], object], target_s: float) -> int:
    fn()  # warm up (first-call allocations, lazy initialisation)
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(10_000, int(target_s / once)))


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 15,
    round_s: float = 0.02,
    on_round: Optional[Callable[[int], None]] = None,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in ``rounds`` interleaved rounds of ~``round_s``."""
    counts = {name: _calls_per_round(fn, round_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            n = counts[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
        if on_round is not None:
            on_round(r)
    return {name: statistics.median(values) for name, values in samples.items()}
