"""Per-module autotune: time each PackedLSTM's kernels on the inputs it really sees, keep the fastest.

``autotune(model, samples)`` runs the model on the sample inputs while recording what every PackedLSTM
receives, then, for each module, times the candidate kernels on those recorded calls (medians of
interleaved rounds, weighted by how often each input shape occurred) and switches the module to the
fastest. Candidates: ``"onednn"`` (packed, bit-identical), ``"stock"`` (nn.LSTM itself) and, with
``exact=False``, ``"cell"`` (single steps through aten.lstm_cell, within 1e-6 of nn.LSTM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .packed import EXACT_KERNELS, KERNELS, PackedLSTM
from .packing import tracked_copy
from .timing import interleaved_medians

__all__ = ["KernelChoice", "autotune"]


@dataclass(frozen=True)
class KernelChoice:
    name: str
    kernel: str
    exact: bool
    ms_per_forward: dict  # kernel -> total ms over the recorded calls of one pass over the samples
    calls: int  # recorded calls per pass over the samples

    def to_dict(self) -> dict:
        return {"name": self.name, "kernel": self.kernel, "exact": self.exact, "calls": self.calls,
                "ms_per_forward": {k: round(v, 4) for k, v in self.ms_per_forward.items()}}


def _record(model: nn.Module, modules: dict, samples: Sequence[tuple]) -> dict:
    """Run the model once over the samples; per module, its distinct call signatures with their counts."""
    seen: dict[str, dict] = {name: {} for name in modules}
    handles = []

    def hook(name):
        def capture(module, args, kwargs):
            input = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            if not isinstance(input, torch.Tensor):
                key = ("other", type(input).__name__)
            else:
                key = (tuple(input.shape), input.dtype, hx is not None)
            entry = seen[name].setdefault(key, [(input, hx), 0])
            entry[1] += 1
        return capture

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            for args in samples:
                model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def autotune(model: nn.Module, samples: Sequence[tuple], *, exact: bool = True, rounds: int = 9,
             round_s: float = 0.01) -> list[KernelChoice]:
    """Switch every PackedLSTM of ``model`` to its fastest kernel on ``samples`` (tuples of forward args)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, PackedLSTM)}
    if not modules or not samples:
        return []
    model.eval()
    recorded = _record(model, modules, samples)
    choices = []
    for name, module in modules.items():
        calls = recorded[name]
        if not calls:
            continue  # the samples never reach this LSTM: keep its kernel
        candidates = [k for k in KERNELS if not exact or k in EXACT_KERNELS]
        if module.packed_dtype is None and module.kernel == "onednn":
            candidates.remove("onednn")  # nothing to pack (a dtype or device the op does not take)
        if "cell" in candidates and module._flat_weights[0].dtype != torch.float32:
            candidates.remove("cell")  # fp32 only
        variants = {}
        for kernel in candidates:
            variant = tracked_copy(module)
            variant.use_kernel(kernel)
            variants[kernel] = variant
        totals = {kernel: 0.0 for kernel in variants}
        with torch.no_grad():
            for (args, count) in calls.values():
                medians = interleaved_medians(
                    {kernel: (lambda v=variant, a=args: v(*a)) for kernel, variant in variants.items()},
                    rounds=rounds, round_s=round_s,
                )
                for kernel, seconds in medians.items():
                    totals[kernel] += seconds * count * 1e3
        best = min(totals, key=totals.get)
        module.use_kernel(best)
        module.autotune_ms = totals
        choices.append(KernelChoice(name, best, best in EXACT_KERNELS,
                                    totals, sum(count for _, count in calls.values())))
    return choices
