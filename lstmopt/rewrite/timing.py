"""Latency measurement shared by the CLI's ``bench`` and ``benchmarks/``: medians of interleaved rounds.

Timing variants side by side, round after round, makes a noisy shared machine slow them all alike, so
their ratios stay meaningful even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Optional

__all__ = ["interleaved_medians"]


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


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 15,
    round_s: float = 0.02,
    warm_s: float = 0.005,
    settle_s: float = 0.0,
    on_round: Optional[Callable[[int], None]] = None,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in ``rounds`` interleaved rounds of ~``round_s``,
    each function warmed up for ``warm_s`` before its timed block. ``settle_s``: a pause before each block,
    for functions whose thread pools keep spinning after a call (ONNX Runtime's do by default), so that
    one does not time another while its threads still hold the CPU."""
    counts = {name: _calls_per_round(fn, round_s) for name, fn in fns.items()}
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
    return {name: statistics.median(values) for name, values in samples.items()}
