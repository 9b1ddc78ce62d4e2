"""``optimize``: swap a model's ``nn.LSTM`` modules for ``PackedLSTM``, its ``nn.LSTMCell`` and
``nn.GRUCell`` modules for ``PackedLSTMCell`` and ``PackedGRUCell`` and (where approximate kernels are
allowed) its ``nn.GRU`` modules for ``PackedGRU``; ``plan``: what it would do and why."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import nn

from lstmopt.errors import UnsupportedError
from lstmopt.kernels import native, table as kernel_table
from lstmopt.rewrite import quantized
from lstmopt.rewrite.decision import Decision, FilterFn
from lstmopt.kernels.accuracy import CONTRACT
from lstmopt.modules.cell import EXACT_CELL_KERNELS, PackedCell, PackedGRUCell, PackedLSTMCell, cell_obstacle, native_obstacle
from lstmopt.modules.gru import PackedGRU, gru_obstacle
from lstmopt.modules.lstm import EXACT_KERNELS, EXACT_SEQUENCE_KERNELS, PackedLSTM
from lstmopt.modules.packs import (NO_EXACT_PROJECTION, PACKABLE_DTYPES, bf16_supported, own_forward, packing_obstacle,
                                   tracked_copy)
from lstmopt.modules.packs import native_obstacle as native_weights_obstacle

__all__ = ["Decision", "FilterFn", "optimize", "plan", "with_kernels"]

def kernels_are_exact(kernel: Optional[str], sequence_kernel: Optional[str]) -> bool:
    return (kernel is None or kernel in EXACT_KERNELS) and (
        sequence_kernel is None or sequence_kernel in EXACT_SEQUENCE_KERNELS)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_request(model: nn.Module, dtype: Optional[torch.dtype]) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("TorchScript modules cannot be rewritten: optimize the Python model, then script it")
    if dtype is not None and dtype not in (*PACKABLE_DTYPES, torch.int8):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.int8, got {dtype}")
    if dtype == torch.int8 and not native.load():
        raise UnsupportedError(f"int8 runs on lstmopt's native kernel, which is unavailable here "
                               f"({native.unavailable_reason()})")
    if dtype == torch.bfloat16 and not bf16_supported() and not native.load():
        raise UnsupportedError(
            "bfloat16 was requested but this CPU has no native bf16 support in oneDNN (it would run slower "
            f"than float32), and lstmopt's native kernel, which would serve it, is unavailable "
            f"({native.unavailable_reason()}); use float32"
        )


def _native_weights(dtype: Optional[torch.dtype]) -> Optional[str]:
    """The native kernel's weight format ``dtype`` asks for, or None where the packed kernels serve it:
    int8 always; bfloat16 where oneDNN has no native bf16 (its emulated bf16 is slower than fp32)."""
    if dtype == torch.int8:
        return "int8"
    if dtype == torch.bfloat16 and not bf16_supported():
        return "bfloat16"
    return None


def _decide(lstm: nn.LSTM, name: str, aliases: tuple[str, ...], dtype: Optional[torch.dtype],
            filter_fn: Optional[FilterFn], exact: bool) -> Decision:
    found = lstm._flat_weights[0].dtype
    target = dtype or found
    kernel, autotune_ms, sequence_kernel, sequence_autotune_ms = None, None, None, None
    if isinstance(lstm, PackedLSTM):
        packed, reason = True, "already a PackedLSTM"
        target, kernel, autotune_ms = found, lstm.kernel, lstm.autotune_ms
        if lstm.native_weights != "float32":
            target = getattr(torch, lstm.native_weights)
        sequence_kernel, sequence_autotune_ms = lstm.sequence_kernel, lstm.sequence_autotune_ms
    elif filter_fn is not None and not filter_fn(lstm, name):
        packed, reason = False, "excluded by filter_fn"
    elif (weights_format := _native_weights(dtype)) is not None:
        obstacle = _low_precision_obstacle(lstm, weights_format)
        packed, reason = obstacle is None, obstacle or LOW_PRECISION_REASONS[weights_format]
        kernel = sequence_kernel = "native"
    else:
        obstacle = packing_obstacle(lstm, dtype)
        if obstacle is None and lstm.proj_size > 0:  # only the native kernel serves it, where it is allowed
            obstacle = NO_EXACT_PROJECTION if exact else _native_projection_obstacle(lstm, target)
            kernel = sequence_kernel = "native"
        packed = obstacle is None
        if obstacle is not None:
            reason = obstacle
        elif lstm.proj_size > 0:
            reason = f"lstmopt's native kernel (proj_size>0 has no exact kernel), {CONTRACT}"
        elif target == found:
            reason = "bit-identical to eager"
        else:
            reason = (f"changes numerics: {_dtype_name(found)} inputs are cast to {_dtype_name(target)} "
                      "and results cast back")
        if packed and own_forward(type(lstm)) is not None:
            reason += f"; {type(lstm).__name__}'s own forward runs, calling the packed LSTM"
    return Decision(
        name=name, aliases=aliases, input_size=lstm.input_size, hidden_size=lstm.hidden_size,
        num_layers=lstm.num_layers, bidirectional=lstm.bidirectional, bias=lstm.bias,
        batch_first=lstm.batch_first, proj_size=lstm.proj_size, dtype=_dtype_name(found),
        packed=packed, packed_dtype=_dtype_name(target) if packed else None,
        exact=not packed or (target == found and kernels_are_exact(kernel, sequence_kernel)), reason=reason,
        kernel=(kernel or kernel_table.default(kernel_table.TENSOR)) if packed else None, autotune_ms=autotune_ms,
        sequence_kernel=(sequence_kernel or kernel_table.default(kernel_table.SEQUENCE)) if packed else None, sequence_autotune_ms=sequence_autotune_ms,
    )


LOW_PRECISION_REASONS = {
    "int8": ("int8 weights (a scale per gate row) on lstmopt's native kernel, activations int16 per row, "
             "state and sums fp32: changes numerics"),
    "bfloat16": ("bf16 weights on lstmopt's native kernel (this CPU has no native bf16 in oneDNN), activations, "
                 "state and sums fp32: changes numerics"),
}


def _low_precision_obstacle(lstm: nn.LSTM, weights_format: str) -> Optional[str]:
    """Why the native kernel cannot run ``lstm`` on ``weights_format`` weights (it stays as it is), or None."""
    obstacle = packing_obstacle(lstm)
    if obstacle is None and lstm.proj_size > 0 and weights_format == "int8":
        obstacle = "int8 serves LSTMs without a projection (proj_size=0)"
    if obstacle is None:
        obstacle = native_weights_obstacle([lstm._parameters[name] for name in lstm._flat_weights_names])
    short = {"int8": "int8", "bfloat16": "bf16"}[weights_format]
    return None if obstacle is None else f"not {short}: {obstacle}"


def _native_projection_obstacle(lstm: nn.LSTM, dtype: torch.dtype) -> Optional[str]:
    weights = [lstm._parameters[name] for name in lstm._flat_weights_names]
    obstacle = native_weights_obstacle(weights) if dtype == torch.float32 else "the native kernel computes in float32 only"
    return None if obstacle is None else f"proj_size>0 runs only on lstmopt's native kernel: {obstacle}"


def _decide_cell(cell: nn.Module, name: str, aliases: tuple[str, ...], exact: bool,
                 filter_fn: Optional[FilterFn]) -> Decision:
    kind = "GRUCell" if isinstance(cell, nn.GRUCell) else "LSTMCell"
    cell_exact = f"ATen's cell op called directly, bit-identical to nn.{kind}"
    kernel = None
    if isinstance(cell, PackedCell):
        packed, reason, kernel = True, f"already a {type(cell).__name__}", cell.kernel
    elif filter_fn is not None and not filter_fn(cell, name):
        packed, reason = False, "excluded by filter_fn"
    elif (obstacle := cell_obstacle(cell)) is not None:
        packed, reason = False, obstacle
    elif exact:
        packed, reason, kernel = True, cell_exact, "aten"
    elif (obstacle := native_obstacle(cell)) is not None:
        packed, reason, kernel = True, f"{cell_exact} (not the native kernel: {obstacle})", "aten"
    else:
        packed, reason, kernel = True, f"lstmopt's native kernel, {CONTRACT}", "native"
    found = _dtype_name(cell.weight_ih.dtype)
    return Decision(
        name=name, aliases=aliases, input_size=cell.input_size, hidden_size=cell.hidden_size, num_layers=1,
        bidirectional=False, bias=cell.bias, batch_first=False, proj_size=0, dtype=found, packed=packed,
        packed_dtype=found if packed else None, exact=not packed or kernel in EXACT_CELL_KERNELS, reason=reason,
        kernel=kernel if packed else None, autotune_ms=getattr(cell, "autotune_ms", None), kind=kind)


NO_EXACT_GRU = ("nn.GRU has no exact kernel (eager runs its own cell loop); --approx runs it on lstmopt's "
                "native kernel")


def _decide_gru(gru: nn.GRU, name: str, aliases: tuple[str, ...], exact: bool,
                filter_fn: Optional[FilterFn]) -> Decision:
    kernel = None
    if isinstance(gru, PackedGRU):
        packed, reason, kernel = True, "already a PackedGRU", gru.kernel
    elif filter_fn is not None and not filter_fn(gru, name):
        packed, reason = False, "excluded by filter_fn"
    elif exact:
        packed, reason = False, NO_EXACT_GRU
    elif (obstacle := gru_obstacle(gru)) is not None:
        packed, reason = False, obstacle
    else:
        packed, reason, kernel = True, f"lstmopt's native kernel (nn.GRU has no exact kernel), {CONTRACT}", "native"
    found = _dtype_name(gru._flat_weights[0].dtype)
    return Decision(
        name=name, aliases=aliases, input_size=gru.input_size, hidden_size=gru.hidden_size,
        num_layers=gru.num_layers, bidirectional=gru.bidirectional, bias=gru.bias, batch_first=gru.batch_first,
        proj_size=0, dtype=found, packed=packed, packed_dtype=found if packed else None,
        exact=not packed or kernel == "stock", reason=reason, kernel=kernel if packed else None,
        autotune_ms=getattr(gru, "autotune_ms", None), sequence_kernel=kernel if packed else None, kind="GRU")


def plan(model: nn.Module, *, dtype: Optional[torch.dtype] = None, filter_fn: Optional[FilterFn] = None,
         exact: bool = True) -> list[Decision]:
    """One ``Decision`` per distinct ``nn.LSTM``, ``nn.LSTMCell``, ``nn.GRU`` and ``nn.GRUCell`` in ``model`` (in module
    order); changes nothing.

    Args:
        model: any module; its LSTMs are found by walking ``named_modules``.
        dtype, filter_fn, exact: as for ``optimize``, whose decisions this predicts.

    Example:
        >>> for decision in lstmopt.plan(model):
        ...     print(decision.name, decision.packed, decision.reason)
    """
    _check_request(model, dtype)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.LSTM, nn.LSTMCell, nn.GRU, nn.GRUCell)):
            names.setdefault(id(module), []).append(name)
    for name, module in model.named_modules(remove_duplicate=False):
        if quantized.is_quantized(module):
            names.setdefault(id(module), []).append(name)
    decisions = []
    for name, module in model.named_modules():
        aliases = tuple(names.get(id(module), [])[1:])
        if quantized.is_quantized(module):
            decisions.append(_decide_quantized(module, name, aliases, filter_fn))
        elif isinstance(module, nn.LSTM):
            decisions.append(_decide(module, name, aliases, dtype, filter_fn, exact))
        elif isinstance(module, (nn.LSTMCell, nn.GRUCell)):
            decisions.append(_in_float32(_decide_cell(module, name, aliases, exact, filter_fn), dtype))
        elif isinstance(module, nn.GRU):
            decisions.append(_in_float32(_decide_gru(module, name, aliases, exact, filter_fn), dtype))
    return decisions


def _in_float32(decision: Decision, dtype: Optional[torch.dtype]) -> Decision:
    """Low-precision weights serve nn.LSTM only: a GRU or cell asked for them runs float32, and its reason says so
    (the table and the report show it; nothing runs at float32 unsaid)."""
    asked = _dtype_name(dtype) if dtype in (torch.bfloat16, torch.int8) else None
    if asked and decision.packed and decision.packed_dtype == "float32" and not decision.reason.startswith("float32"):
        return replace(decision, reason=f"float32, not {asked} ({asked} weights serve nn.LSTM only): {decision.reason}")
    return decision


def optimize(model: nn.Module, *, dtype: Optional[torch.dtype] = None,
             filter_fn: Optional[FilterFn] = None, inplace: bool = False,
             autotune: Optional[Sequence[tuple]] = None, exact: bool = True) -> nn.Module:
    """Return ``model`` with every eligible ``nn.LSTM`` replaced by a ``PackedLSTM``, every
    ``nn.LSTMCell`` or ``nn.GRUCell`` by a ``PackedLSTMCell`` or ``PackedGRUCell`` and, with ``exact=False``,
    every ``nn.GRU`` by a ``PackedGRU``.

    Args:
        model: the model to optimize; copied first unless ``inplace=True``.
        dtype: None keeps each LSTM's dtype (bit-identical results). ``torch.bfloat16`` packs in bf16 for
            oneDNN and casts at the LSTM's boundary where the CPU has native bf16, and elsewhere runs the
            native kernel on bf16 weights; ``torch.int8`` runs each fp32 LSTM without a projection on the
            native kernel with int8 weights (``LOW_PRECISION_REASONS``; on the native kernel the parameters
            stay fp32). Both change numerics: ``lstmopt.job.low_precision`` measures how much.
        filter_fn: ``filter_fn(module, name)`` returning False keeps that LSTM as it is.
        inplace: swap the LSTMs of ``model`` itself (each keeps its identity, see ``PackedLSTM.convert_``).
        autotune: representative inputs (tuples of forward arguments); each packed LSTM is then timed with
            every kernel on the calls it receives and keeps the fastest (``lstmopt.rewrite.autotune``).
        exact: False also admits the approximate kernels of the kernel table (``lstmopt.kernels.table``):
            autotune may choose them, and cells, LSTMs with ``proj_size > 0`` and GRUs (the last two
            have no exact kernel but their own, and stay as they are otherwise) run lstmopt's native kernel.

    Example:
        >>> fast = lstmopt.optimize(model, autotune=[(example,)], exact=False)
        >>> lstmopt.plan(fast)  # every LSTM with its decision and kernels
    """
    decisions = plan(model, dtype=dtype, filter_fn=filter_fn, exact=exact)
    if not inplace:
        try:
            model = tracked_copy(model)
        except Exception as exc:  # user models may hold uncopyable state (locks, files, ...)
            raise TypeError(f"cannot copy the model ({exc}); pass inplace=True") from exc
    for decision in decisions:
        if decision.packed and decision.dtype in quantized.QUANTIZED_DTYPES:
            _replace_quantized(model, decision)
        elif decision.packed and decision.kind in ("LSTMCell", "GRUCell"):
            cls = PackedGRUCell if decision.kind == "GRUCell" else PackedLSTMCell
            cls.convert_(model.get_submodule(decision.name), decision.kernel)
        elif decision.packed and decision.kind == "GRU":
            PackedGRU.convert_(model.get_submodule(decision.name), decision.kernel)
        elif decision.packed and _native_weights(dtype) is not None:
            lstm = PackedLSTM.convert_(model.get_submodule(decision.name))
            lstm.use_kernel("native", sequence_kernel="native", native_weights=_native_weights(dtype))
        elif decision.packed:
            lstm = PackedLSTM.convert_(model.get_submodule(decision.name), dtype)
            if lstm.proj_size > 0 and decision.kernel == "native":
                lstm.use_kernel("native", sequence_kernel="native")
    if autotune is not None:
        from lstmopt.rewrite.autotune import autotune as tune

        tune(model, autotune, exact=exact)
    return model


def _decide_quantized(module: nn.Module, name: str, aliases: tuple[str, ...],
                      filter_fn: Optional[FilterFn]) -> Decision:
    kind, found = quantized.quantized_kind(module), quantized.quantized_dtype(module)
    what = f"torch.ao dynamic-quantized ({found}) {kind}"
    kernel = sequence_kernel = packed_dtype = None
    if filter_fn is not None and not filter_fn(module, name):
        packed, reason = False, "excluded by filter_fn"
    elif (obstacle := quantized.obstacle(module)) is not None:
        packed, reason = False, obstacle
    elif kind == "LSTM" and found == "qint8" and native.load(quiet=True):
        packed, packed_dtype, kernel, sequence_kernel = True, "int8", "native", "native"
        reason = (f"{what}: its int8 weights, requantized per gate row, on lstmopt's native kernel; error against "
                  "the quantized original measured")
    elif kind == "LSTM":
        packed, packed_dtype = True, "float32"
        kernel, sequence_kernel = kernel_table.default(kernel_table.TENSOR), kernel_table.default(kernel_table.SEQUENCE)
        reason = f"{what}: its dequantized weights on the packed oneDNN kernel; error against the quantized original measured"
    else:
        packed, packed_dtype, kernel = True, "float32", "native"
        sequence_kernel = "native" if kind == "GRU" else None
        reason = (f"{what}: its dequantized weights on lstmopt's native kernel; error against the quantized "
                  "original measured")
    layered = kind in ("LSTM", "GRU")
    return Decision(
        name=name, aliases=aliases, input_size=module.input_size, hidden_size=module.hidden_size,
        num_layers=module.num_layers if layered else 1, bidirectional=module.bidirectional if layered else False,
        bias=module.bias, batch_first=module.batch_first if layered else False, proj_size=0, dtype=found,
        packed=packed, packed_dtype=packed_dtype, exact=not packed, reason=reason, kernel=kernel,
        sequence_kernel=sequence_kernel, kind=kind)


def _replace_quantized(model: nn.Module, decision: Decision) -> None:
    """Put lstmopt's module for the torch.ao module ``decision`` names in its place (and its aliases')."""
    plain = quantized.dequantized(model.get_submodule(decision.name))
    if decision.kind == "LSTM":
        replacement = PackedLSTM.convert_(plain)
        if decision.kernel == "native":
            replacement.use_kernel("native", sequence_kernel="native", native_weights=decision.packed_dtype)
    elif decision.kind == "GRU":
        replacement = PackedGRU.convert_(plain, decision.kernel)
    else:
        replacement = (PackedGRUCell if decision.kind == "GRUCell" else PackedLSTMCell).convert_(plain, decision.kernel)
    for name in (decision.name, *decision.aliases):
        parent, _, child = name.rpartition(".")
        if not name:
            raise ValueError("a torch.ao module given alone is not rebuilt in place; optimize the model that holds it")
        model.get_submodule(parent)._modules[child] = replacement


def with_kernels(decisions: Sequence[Decision], optimized: nn.Module, *,
                 dtype: Optional[torch.dtype] = None) -> list[Decision]:
    """``decisions`` (from ``plan`` on the original model, for ``dtype``) updated with the kernels each packed LSTM
    of ``optimized`` ended up with (after ``autotune``) and whether its results stay bit-identical."""
    updated = []
    for decision in decisions:
        module = optimized.get_submodule(decision.name) if decision.packed else None
        if isinstance(module, (PackedCell, PackedGRU)):
            gru = isinstance(module, PackedGRU)
            kernel = kernel_table.find(module.kernel, module.INPUTS)
            decision = replace(decision, kernel=module.kernel, autotune_ms=module.autotune_ms, exact=kernel.exact,
                               sequence_kernel=module.kernel if gru else None)
            note = module.autotune_notes.get("gru" if gru else "cell")
            if note:
                decision = replace(decision, reason=f"autotune: {_note(kernel, note) or note}")
        elif isinstance(module, PackedLSTM):
            decision = replace(decision, kernel=module.kernel, autotune_ms=module.autotune_ms,
                               sequence_kernel=module.sequence_kernel,
                               sequence_autotune_ms=module.sequence_autotune_ms,
                               exact=decision.exact and kernels_are_exact(module.kernel, module.sequence_kernel))
            measured = getattr(module, "autotune_notes", {})
            notes = [_note(kernel_table.find(module.kernel, kernel_table.TENSOR), measured.get("tensor")),
                     _note(kernel_table.find(module.sequence_kernel, kernel_table.SEQUENCE), measured.get("sequence"))]
            notes = [note for note in notes if note]
            if notes:
                decision = replace(decision, reason="autotune: " + "; ".join(notes))
            elif measured:
                decision = replace(decision, reason=f"{decision.reason}; autotune {'; '.join(measured.values())}")
        updated.append(decision)
    return [_in_float32(decision, dtype) for decision in updated]


def _note(kernel: kernel_table.Kernel, measured: Optional[str]) -> Optional[str]:
    """Why autotune picked ``kernel`` over the default, in the words of the LSTMs table (with what it
    measured, ``autotune_notes``); None for the default."""
    if kernel.default or not kernel.chosen_because:
        return None
    text = kernel.chosen_because + (f" ({measured})" if measured and not measured.startswith("kept") else "")
    return text + ("" if kernel.exact else f"; {CONTRACT}, not bit-identical")
