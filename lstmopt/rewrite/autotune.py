"""Per-module autotune: time each PackedLSTM's (and packed cell's, PackedGRU's, PackedRNN's) kernels on the inputs
it really sees, keep the fastest.

``autotune(model, samples)`` runs the model on the sample inputs while recording what every PackedLSTM
receives, then, for each module and kind of input (tensors, PackedSequences), times every kernel of the
kernel table (``lstmopt.kernels.table``) that serves all the recorded calls against the default kernel,
side by side, on one pass over those calls (``timing.compare``). A kernel replaces the default only where
it is faster beyond the timing noise: the whole 95% interval of its time over the default's lies below
``1 - MARGIN``. Otherwise the default stays, and the module's ``autotune_notes`` say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import native
from lstmopt.kernels import table as kernel_table
from lstmopt.modules.lstm import EXACT_KERNELS, EXACT_SEQUENCE_KERNELS, KERNELS, SEQUENCE_KERNELS, PackedLSTM
from lstmopt.modules.packs import tracked_copy, weights_obstacle
from lstmopt.modules.cell import CELL_KERNELS, DEFAULT, EXACT_CELL_KERNELS, PackedCell, cell_obstacle, native_obstacle
from lstmopt.modules.one_state import PackedOneState
from lstmopt.modules.pack_state import OneKernel, PackedModule
from lstmopt.rewrite.timing import Ratio, compare

__all__ = ["MARGIN", "KernelChoice", "autotune"]

MARGIN = 0.03
"""A kernel must take at most 97% of the default's time, the whole interval of it, to replace the default:
differences smaller than that are not worth leaving the default (bit-identical, or nn.LSTM's own) for."""
MAX_CALLS_PER_PASS = 64  # a recorded pass is replayed with counts scaled down to about this many calls

# The ways a bf16 LSTM on the native kernel may compute, each (tensor kernel, sequence kernel, weights format).
# fp32 on the default kernels is a candidate too: at large shapes oneDNN's fp32 GEMMs can beat the native kernel on
# either weights, and a bf16 request must never run slower than fp32 would.
WEIGHTS_CANDIDATES = {
    "bfloat16": ("native", "native", "bfloat16"),
    "float32": ("native", "native", "float32"),
    "float32 on default kernels": (kernel_table.default(kernel_table.TENSOR),
                                   kernel_table.default(kernel_table.SEQUENCE), "float32"),
}


@dataclass(frozen=True)
class KernelChoice:
    """What autotune chose for one module, for one kind of input ("tensor", "sequence"; "cell", "gru"), and why;
    or, for ``inputs == "weights"``, how a bf16 LSTM on the native kernel computes (``kernel``, a key of
    ``WEIGHTS_CANDIDATES``)."""

    name: str
    inputs: str
    kernel: str
    exact: bool
    ms_per_forward: dict  # kernel -> ms over the recorded calls of one pass over the samples
    calls: int  # recorded calls per pass over the samples
    baseline: str = ""  # the default kernel the others were timed against
    ratios: dict = field(default_factory=dict)  # kernel -> Ratio of its time to the baseline's
    not_serving: tuple = ()  # kernels left out: some recorded call would have taken nn.LSTM's path
    note: str = ""  # the verdict in words, for reports

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": self.inputs, "kernel": self.kernel, "exact": self.exact,
                "calls": self.calls, "ms_per_forward": {k: round(v, 4) for k, v in self.ms_per_forward.items()},
                "baseline": self.baseline, "ratios": {k: r.to_dict() for k, r in self.ratios.items()},
                "not_serving": list(self.not_serving), "note": self.note}


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


def _serves(variant: nn.Module, calls: list) -> bool:
    """Whether the kernel just switched on ``variant`` takes every recorded call itself (the module says)."""
    return all(variant.serves(input, hx) for (input, hx), _ in calls)


def _one_pass(variant: PackedLSTM, calls: list, scale: float):
    """A function replaying the recorded calls on ``variant``, each as often as recorded times ``scale``."""
    replay = [(args, max(1, round(count * scale))) for args, count in calls]

    def run():
        for args, count in replay:
            for _ in range(count):
                variant(*args)
    return run


def _fastest(module: PackedLSTM, calls: list, candidates: list[str], baseline: str, switch,
             rounds: int, round_s: float) -> tuple[str, dict, dict, tuple]:
    """Time ``module`` switched (``switch(copy, kernel)``) to each candidate serving ``calls`` against
    ``baseline``; the kernel chosen, ms per pass over the samples, each Ratio, and the kernels left out."""
    variants, not_serving = {}, []
    for kernel in candidates:
        variant = tracked_copy(module)
        switch(variant, kernel)
        if kernel == baseline or _serves(variant, calls):
            variants[kernel] = variant
        else:
            not_serving.append(kernel)
    total = sum(count for _, count in calls)
    scale = min(1.0, MAX_CALLS_PER_PASS / total)
    passes = {kernel: _one_pass(variant, calls, scale) for kernel, variant in variants.items()}
    with torch.no_grad():
        measured = compare(passes, baseline=baseline, rounds=rounds, round_s=round_s)
    replayed = sum(max(1, round(count * scale)) for _, count in calls)
    ms = {kernel: seconds * 1e3 * total / replayed for kernel, seconds in measured.medians.items()}
    winners = [k for k, ratio in measured.ratios.items() if ratio.high < 1 - MARGIN]
    best = min(winners, key=lambda k: measured.ratios[k].median) if winners else baseline
    return best, ms, measured.ratios, tuple(not_serving)


def _note(kernel: str, baseline: str, ratios: dict[str, Ratio], not_serving: tuple) -> str:
    if kernel != baseline:
        r = ratios[kernel]
        return f"{r.median:.2f}x {baseline}'s time, 95% interval {r.low:.2f}-{r.high:.2f}x"
    note = f"kept {baseline}: no kernel was faster beyond the timing noise"
    if not_serving:
        note += f" ({', '.join(not_serving)} would not serve every call)"
    return note


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
    modules = {name: m for name, m in model.named_modules() if isinstance(m, PackedModule)}
    if not modules or not samples:
        return []
    model.eval()
    recorded = _record(model, modules, samples)
    choices = []
    for name, module in modules.items():
        if isinstance(module, OneKernel):
            cell = module.INPUTS in (kernel_table.CELL, kernel_table.GRU_CELL)
            choose = _choose_cell if cell else _choose_one_state
            choice = choose(module, name, recorded[name], exact, rounds, round_s)
            if choice is not None:
                module.use_kernel(choice.kernel)
                module.autotune_ms, module.autotune_notes = choice.ms_per_forward, {choice.inputs: choice.note}
                choices.append(choice)
            continue
        if module.native_weights == "bfloat16":
            choice = _choose_weights(module, name, recorded[name], rounds, round_s)
            if choice is not None:
                kernel, sequence_kernel, weights = WEIGHTS_CANDIDATES[choice.kernel]
                module.use_kernel(kernel, sequence_kernel=sequence_kernel, native_weights=weights)
                module.autotune_ms, module.autotune_notes = choice.ms_per_forward, {choice.inputs: choice.note}
                choices.append(choice)
        elif module.native_weights == "float32":  # (int8: only the native kernel computes it, as asked)
            choices += _tune_lstm(module, name, recorded[name], exact, rounds, round_s)
    return choices


def _tune_lstm(module: PackedLSTM, name: str, recorded: dict, exact: bool, rounds: int,
               round_s: float) -> list[KernelChoice]:
    """An fp32 PackedLSTM's kernels: one for tensors and one for PackedSequences, each timed on its calls."""
    by_kind: dict[str, list] = {"tensor": [], "sequence": []}
    for signature, (args, count) in recorded.items():
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
    module.autotune_notes = {c.inputs: c.note for c in (tensor_choice, sequence_choice) if c is not None}
    return [c for c in (tensor_choice, sequence_choice) if c is not None]


def _choose_weights(lstm: PackedLSTM, name: str, recorded: dict, rounds: int,
                    round_s: float) -> Optional[KernelChoice]:
    """bf16 weights on the native kernel (a CPU without native bf16 in oneDNN, where they are widened as they are
    read) against fp32 weights on the same kernel and on the default kernels, on every recorded call: bf16 is kept
    unless another is faster beyond the noise (fp32 is also more accurate). ``KernelChoice.kernel`` is the key of
    ``WEIGHTS_CANDIDATES`` chosen."""
    calls = [entry for signature, entry in recorded.items() if signature[0] in ("tensor", "sequence")]
    if not calls:
        return None
    candidates = [label for label, (kernel, _, _) in WEIGHTS_CANDIDATES.items()
                  if kernel in kernel_table.names(kernel_table.TENSOR, projection=lstm.proj_size > 0)]

    def switch(variant, label):
        kernel, sequence_kernel, weights = WEIGHTS_CANDIDATES[label]
        variant.use_kernel(kernel, sequence_kernel=sequence_kernel, native_weights=weights)
    best, ms, ratios, not_serving = _fastest(lstm, calls, candidates, "bfloat16", switch, rounds, round_s)
    return KernelChoice(name, "weights", best, False, ms, sum(count for _, count in calls), "bfloat16", ratios,
                        not_serving, _note(best, "bfloat16", ratios, not_serving))


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
    if module.proj_size > 0:
        candidates = [k for k in candidates if facts[k].projection]
    default = kernel_table.default(kind)
    baseline = default if default in candidates else "stock"
    best, ms, ratios, not_serving = _fastest(module, calls, candidates, baseline, switch, rounds, round_s)
    return KernelChoice(name, inputs, best, best in allowed_exact, ms, sum(count for _, count in calls), baseline,
                        ratios, not_serving, _note(best, baseline, ratios, not_serving))


def _choose_cell(cell: PackedCell, name: str, recorded: dict, exact: bool, rounds: int,
                 round_s: float) -> Optional[KernelChoice]:
    """The cell kernels (only the exact ones with ``exact``) against the default, ATen's cell op."""
    calls = [entry for signature, entry in recorded.items() if signature[0] == "tensor"]
    if not calls or cell_obstacle(cell) is not None:
        return None
    candidates = list(EXACT_CELL_KERNELS if exact else CELL_KERNELS)
    if "native" in candidates and (not native.load() or native_obstacle(cell) is not None):
        candidates.remove("native")
    baseline = DEFAULT
    best, ms, ratios, not_serving = _fastest(cell, calls, candidates, baseline,
                                             lambda variant, kernel: variant.use_kernel(kernel), rounds, round_s)
    return KernelChoice(name, "cell", best, kernel_table.find(best, cell.INPUTS).exact, ms,
                        sum(count for _, count in calls), baseline, ratios, not_serving,
                        _note(best, baseline, ratios, not_serving))


def _choose_one_state(module: PackedOneState, name: str, recorded: dict, exact: bool, rounds: int,
                      round_s: float) -> Optional[KernelChoice]:
    """A GRU's or RNN's kernels: the native kernel against the torch module itself on every recorded call,
    tensors and PackedSequences alike (with ``exact``, only the torch module: there is no exact kernel to time).
    ``KernelChoice.inputs`` is the kind in lower case ("gru", "rnn")."""
    calls = [entry for signature, entry in recorded.items() if signature[0] in ("tensor", "sequence")]
    if not calls:
        return None
    candidates = ["stock"] if exact or not native.load() else list(module.KERNELS)
    baseline = "native" if "native" in candidates else "stock"
    best, ms, ratios, not_serving = _fastest(module, calls, candidates, baseline,
                                             lambda variant, kernel: variant.use_kernel(kernel), rounds, round_s)
    return KernelChoice(name, module.TORCH_CLASS.__name__.lower(), best, kernel_table.find(best, module.INPUTS).exact,
                        ms, sum(count for _, count in calls), baseline, ratios, not_serving,
                        _note(best, baseline, ratios, not_serving))
