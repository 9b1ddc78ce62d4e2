"""The ``nn.LSTM`` kind: ``PackedLSTM`` on oneDNN's packed op (exact) or lstmopt's native kernel (``--approx``,
proj_size > 0, or int8/bf16 weights)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.modules.lstm import EXACT_KERNELS, EXACT_SEQUENCE_KERNELS, PackedLSTM
from lstmopt.modules.packs import NO_EXACT_PROJECTION, bf16_supported, dtype_name, own_forward, packing_obstacle
from lstmopt.modules.packs import native_obstacle as native_weights_obstacle
from lstmopt.rewrite.decision import Decision
from lstmopt.rewrite.kinds.handler import Handler, Request, autotune_note

__all__ = ["LSTMHandler", "kernels_are_exact", "native_weights"]

def kernels_are_exact(kernel: Optional[str], sequence_kernel: Optional[str]) -> bool:
    return (kernel is None or kernel in EXACT_KERNELS) and (
        sequence_kernel is None or sequence_kernel in EXACT_SEQUENCE_KERNELS)


def native_weights(dtype: Optional[torch.dtype]) -> Optional[str]:
    """The native kernel's weight format ``dtype`` asks for, or None where the packed kernels serve it:
    int8 always; bfloat16 where oneDNN has no native bf16 (its emulated bf16 is slower than fp32)."""
    if dtype == torch.int8:
        return "int8"
    if dtype == torch.bfloat16 and not bf16_supported():
        return "bfloat16"
    return None


class LSTMHandler(Handler):
    kind = "LSTM"
    packed_classes = (PackedLSTM,)

    def decide(self, lstm: nn.LSTM, name: str, aliases: tuple[str, ...], request: Request) -> Decision:
        found = lstm._flat_weights[0].dtype
        target = request.dtype or found
        kernel, autotune_ms, sequence_kernel, sequence_autotune_ms = None, None, None, None
        if self.is_packed(lstm):
            packed, reason = True, "already a PackedLSTM"
            target, kernel, autotune_ms = found, lstm.kernel, lstm.autotune_ms
            if lstm.native_weights != "float32":
                target = getattr(torch, lstm.native_weights)
            sequence_kernel, sequence_autotune_ms = lstm.sequence_kernel, lstm.sequence_autotune_ms
        elif request.excludes(lstm, name):
            packed, reason = False, "excluded by filter_fn"
        elif (weights_format := native_weights(request.dtype)) is not None:
            obstacle = _low_precision_obstacle(lstm, weights_format)
            packed, reason = obstacle is None, obstacle or kernel_table.weights_format(weights_format).what
            kernel = sequence_kernel = "native"
        else:
            obstacle = packing_obstacle(lstm, request.dtype)
            if obstacle is None and lstm.proj_size > 0:  # only the native kernel serves it, where it is allowed
                obstacle = NO_EXACT_PROJECTION if request.exact else _native_projection_obstacle(lstm, target)
                kernel = sequence_kernel = "native"
            packed, reason = obstacle is None, obstacle or _packed_reason(lstm, found, target)
        return Decision(
            name=name, aliases=aliases, input_size=lstm.input_size, hidden_size=lstm.hidden_size,
            num_layers=lstm.num_layers, bidirectional=lstm.bidirectional, bias=lstm.bias,
            batch_first=lstm.batch_first, proj_size=lstm.proj_size, dtype=dtype_name(found),
            packed=packed, packed_dtype=dtype_name(target) if packed else None,
            exact=not packed or (target == found and kernels_are_exact(kernel, sequence_kernel)), reason=reason,
            kernel=(kernel or kernel_table.default(kernel_table.TENSOR)) if packed else None, autotune_ms=autotune_ms,
            sequence_kernel=(sequence_kernel or kernel_table.default(kernel_table.SEQUENCE)) if packed else None,
            sequence_autotune_ms=sequence_autotune_ms,
        )

    def convert(self, model: nn.Module, decision: Decision, request: Request) -> None:
        weights_format = native_weights(request.dtype)
        if weights_format is not None:
            lstm = PackedLSTM.convert_(model.get_submodule(decision.name))
            lstm.use_kernel("native", sequence_kernel="native", native_weights=weights_format)
            return
        lstm = PackedLSTM.convert_(model.get_submodule(decision.name), request.dtype)
        if lstm.proj_size > 0 and decision.kernel == "native":
            lstm.use_kernel("native", sequence_kernel="native")

    def with_kernels(self, decision: Decision, lstm: nn.Module) -> Decision:
        if not self.is_packed(lstm):
            return decision
        if "weights" in getattr(lstm, "autotune_notes", {}):
            return _with_weights(decision, lstm)
        decision = replace(decision, kernel=lstm.kernel, autotune_ms=lstm.autotune_ms,
                           sequence_kernel=lstm.sequence_kernel, sequence_autotune_ms=lstm.sequence_autotune_ms,
                           exact=decision.exact and kernels_are_exact(lstm.kernel, lstm.sequence_kernel))
        measured = getattr(lstm, "autotune_notes", {})
        notes = [autotune_note(kernel_table.find(lstm.kernel, kernel_table.TENSOR), measured.get("tensor")),
                 autotune_note(kernel_table.find(lstm.sequence_kernel, kernel_table.SEQUENCE), measured.get("sequence"))]
        notes = [note for note in notes if note]
        if notes:
            return replace(decision, reason="autotune: " + "; ".join(notes))
        if measured:
            return replace(decision, reason=f"{decision.reason}; autotune {'; '.join(measured.values())}")
        return decision


def _with_weights(decision: Decision, lstm: PackedLSTM) -> Decision:
    """After autotune timed a bf16 LSTM's ways to compute (``autotune.WEIGHTS_CANDIDATES``): bf16 or fp32
    weights on the native kernel, or fp32 on the default kernels, which is exact on fp32 weights."""
    measured, chosen = lstm.autotune_notes["weights"], lstm.native_weights
    exact = chosen == decision.dtype and kernels_are_exact(lstm.kernel, lstm.sequence_kernel)
    if chosen == decision.packed_dtype:
        reason = f"{decision.reason}; autotune {measured}"
    else:
        on = "lstmopt's native kernel" if lstm.kernel == "native" else f"the {lstm.kernel} kernel"
        reason = (f"autotune: {chosen} weights on {on} measured faster than the {decision.packed_dtype} asked "
                  f"for ({measured}), {'bit-identical to eager' if exact else CONTRACT}")
    return replace(decision, packed_dtype=chosen, kernel=lstm.kernel, sequence_kernel=lstm.sequence_kernel,
                   autotune_ms=lstm.autotune_ms, reason=reason, exact=exact)


def _packed_reason(lstm: nn.LSTM, found: torch.dtype, target: torch.dtype) -> str:
    if lstm.proj_size > 0:
        reason = f"lstmopt's native kernel (proj_size>0 has no exact kernel), {CONTRACT}"
    elif target == found:
        reason = "bit-identical to eager"
    else:
        reason = (f"changes numerics: {dtype_name(found)} inputs are cast to {dtype_name(target)} "
                  "and results cast back")
    if own_forward(type(lstm)) is not None:
        reason += f"; {type(lstm).__name__}'s own forward runs, calling the packed LSTM"
    return reason


def _low_precision_obstacle(lstm: nn.LSTM, name: str) -> Optional[str]:
    """Why the native kernel cannot run ``lstm`` on ``name`` weights (it stays as it is), or None."""
    weights = kernel_table.weights_format(name)
    obstacle = packing_obstacle(lstm)
    if obstacle is None and lstm.proj_size > 0 and not weights.projection:
        obstacle = weights.projection_obstacle()
    if obstacle is None:
        obstacle = native_weights_obstacle([lstm._parameters[name] for name in lstm._flat_weights_names])
    return None if obstacle is None else f"not {weights.short}: {obstacle}"


def _native_projection_obstacle(lstm: nn.LSTM, dtype: torch.dtype) -> Optional[str]:
    weights = [lstm._parameters[name] for name in lstm._flat_weights_names]
    obstacle = native_weights_obstacle(weights) if dtype == torch.float32 else "the native kernel computes in float32 only"
    return None if obstacle is None else f"proj_size>0 runs only on lstmopt's native kernel: {obstacle}"
