"""Per-module autotune: time each PackedLSTM's kernels on the inputs it really sees, keep the fastest.

``autotune(model, samples)`` runs the model on the sample inputs while recording what every PackedLSTM
receives, then, for each module, times the candidate kernels on those recorded calls (medians of
interleaved rounds, weighted by how often each input shape occurred) and switches the module to the
fastest. Tensor calls choose ``PackedLSTM.kernel``: ``"onednn"`` (packed, bit-identical), ``"stock"``
(nn.LSTM itself) and, with ``exact=False``, ``"cell"`` (single steps through aten.lstm_cell) and
``"native"`` (lstmopt's own kernel, where it can be built), both within 1e-6 of nn.LSTM. PackedSequence
calls choose ``PackedLSTM.sequence_kernel``: ``"stock"`` and, with ``exact=False``, ``"onednn"`` (the
packed op on padded runs) and ``"native"``, within 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import native
from lstmopt.kernels import table as kernel_table
from lstmopt.modules.lstm import EXACT_KERNELS, EXACT_SEQUENCE_KERNELS, KERNELS, SEQUENCE_KERNELS, PackedLSTM
from lstmopt.modules.packs import tracked_copy, weights_obstacle
from lstmopt.rewrite.timing import interleaved_medians

__all__ = ["KernelChoice", "autotune"]


@dataclass(frozen=True)
class KernelChoice:
    """What autotune chose for one module, for one kind of input ("tensor" or "sequence")."""

    name: str
    inputs: str
    kernel: str
    exact: bool
    ms_per_forward: dict  # kernel -> total ms over the recorded calls of one pass over the samples
    calls: int  # recorded calls per pass over the samples

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": self.inputs, "kernel": self.kernel, "exact": self.exact,
                "calls": self.calls, "ms_per_forward": {k: round(v, 4) for k, v in self.ms_per_forward.items()}}


def _signature(input, hx) -> tuple:
    if isinstance(input, PackedSequence):
        return ("sequence", tuple(input.data.shape), tuple(input.batch_sizes.tolist()), hx is not None)
    if isinstance(input, torch.Tensor):
        return ("tensor", tuple(input.shape), input.dtype, hx is not None)
    return ("other", type(input).__name__)


def _record(model: nn.Module, modules: dict, samples: Sequence[tuple]) -> dict:
    """Run the model once over the samples; per module, its distinct call signatures with their counts."""
    seen: dict[str, dict] = {name: {} for name in modules}
    handles = []

    def hook(name):
        def capture(module, args, kwargs):
            input = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            entry = seen[name].setdefault(_signature(input, hx), [(input, hx), 0])
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


def _fastest(module: PackedLSTM, calls: list, candidates: list[str], switch, rounds: int,
             round_s: float) -> tuple[str, dict]:
    """Time ``module`` switched (``switch(copy, kernel)``) to each candidate on ``calls``; the fastest and all
    totals (ms per pass over the samples)."""
    variants = {}
    for kernel in candidates:
        variant = tracked_copy(module)
        switch(variant, kernel)
        variants[kernel] = variant
    totals = {kernel: 0.0 for kernel in variants}
    with torch.no_grad():
        for args, count in calls:
            medians = interleaved_medians(
                {kernel: (lambda v=variant, a=args: v(*a)) for kernel, variant in variants.items()},
                rounds=rounds, round_s=round_s,
            )
            for kernel, seconds in medians.items():
                totals[kernel] += seconds * count * 1e3
    return min(totals, key=totals.get), totals


def autotune(model: nn.Module, samples: Sequence[tuple], *, exact: bool = True, rounds: int = 9,
             round_s: float = 0.01) -> list[KernelChoice]:
    """Switch every PackedLSTM of ``model`` to its fastest kernels on ``samples``.

    Args:
        model: a model whose LSTMs ``optimize`` packed.
        samples: tuples of forward arguments, run once to record what each LSTM receives.
        exact: False also times the approximate kernels of the kernel table.
        rounds, round_s: interleaved timing rounds per kernel and the length of each.

    Returns:
        One ``KernelChoice`` per LSTM and input kind (tensors, PackedSequences) it received.

    Example:
        >>> choices = autotune(lstmopt.optimize(model), [(torch.randn(1, 1, 40),)], exact=False)
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, PackedLSTM)}
    if not modules or not samples:
        return []
    model.eval()
    recorded = _record(model, modules, samples)
    choices = []
    for name, module in modules.items():
        by_kind: dict[str, list] = {"tensor": [], "sequence": []}
        for signature, (args, count) in recorded[name].items():
            if signature[0] in by_kind:
                by_kind[signature[0]].append((args, count))
        tensor_choice = _choose(module, name, "tensor", by_kind["tensor"], exact, rounds, round_s)
        sequence_choice = _choose(module, name, "sequence", by_kind["sequence"], exact, rounds, round_s)
        module.use_kernel(tensor_choice.kernel if tensor_choice else None,
                          sequence_kernel=sequence_choice.kernel if sequence_choice else None)
        if tensor_choice:
            module.autotune_ms = tensor_choice.ms_per_forward
        if sequence_choice:
            module.sequence_autotune_ms = sequence_choice.ms_per_forward
        choices += [c for c in (tensor_choice, sequence_choice) if c is not None]
    return choices


def _choose(module: PackedLSTM, name: str, inputs: str, calls: list, exact: bool, rounds: int,
            round_s: float) -> Optional[KernelChoice]:
    if not calls:
        return None  # the samples never give this LSTM such inputs: keep its kernel
    weights_dtype = module._flat_weights[0].dtype
    packable = module.packed_dtype is not None or weights_obstacle(module._flat_weights) is None
    if inputs == "tensor":
        candidates = [k for k in KERNELS if not exact or k in EXACT_KERNELS]

        def switch(variant, kernel):
            variant.use_kernel(kernel)
        allowed_exact = EXACT_KERNELS
    else:
        candidates = [k for k in SEQUENCE_KERNELS if not exact or k in EXACT_SEQUENCE_KERNELS]

        def switch(variant, kernel):
            variant.use_kernel(sequence_kernel=kernel)
        allowed_exact = EXACT_SEQUENCE_KERNELS
    kind = kernel_table.TENSOR if inputs == "tensor" else kernel_table.SEQUENCE
    facts = {name: kernel_table.find(name, kind) for name in candidates}
    if weights_dtype != torch.float32:
        candidates = [k for k in candidates if not facts[k].fp32_only]
    if any(facts[k].native for k in candidates) and not native.load():
        candidates = [k for k in candidates if not facts[k].native]  # no compiler here: load() said so
    if not packable:
        candidates = [k for k in candidates if not facts[k].reads_packs]  # nothing to pack (dtype, device)
    best, totals = _fastest(module, calls, candidates, switch, rounds, round_s)
    return KernelChoice(name, inputs, best, best in allowed_exact, totals, sum(count for _, count in calls))
