"""``optimize``: swap a model's recurrent modules for lstmopt's packed ones; ``plan``: what it would do and why;
``with_kernels``: what the optimized model ended up running. Each is one loop over the model, asking the
handler of each module's kind (``lstmopt.rewrite.kinds``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from lstmopt.errors import UnsupportedError
from lstmopt.kernels import native
from lstmopt.modules.packs import PACKABLE_DTYPES, bf16_supported, tracked_copy
from lstmopt.rewrite.decision import Decision, FilterFn
from lstmopt.rewrite.kinds import Request, handler_for
from lstmopt.rewrite.kinds.handler import in_float32

__all__ = ["Decision", "FilterFn", "optimize", "plan", "with_kernels"]


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


def plan(model: nn.Module, *, dtype: Optional[torch.dtype] = None, filter_fn: Optional[FilterFn] = None,
         exact: bool = True) -> list[Decision]:
    """One ``Decision`` per distinct recurrent module in ``model`` (``nn.LSTM``, ``nn.LSTMCell``, ``nn.GRU``,
    ``nn.GRUCell``, ``nn.RNN``, torch.ao's dynamic-quantized ones; in module order); changes nothing.

    Args:
        model: any module; its recurrent modules are found by walking ``named_modules``.
        dtype, filter_fn, exact: as for ``optimize``, whose decisions this predicts.

    Example:
        >>> for decision in lstmopt.plan(model):
        ...     print(decision.name, decision.packed, decision.reason)
    """
    _check_request(model, dtype)
    request = Request(dtype, filter_fn, exact)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if handler_for(module) is not None:
            names.setdefault(id(module), []).append(name)
    decisions = []
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is not None:
            decisions.append(handler.decide(module, name, tuple(names[id(module)][1:]), request))
    return decisions


def optimize(model: nn.Module, *, dtype: Optional[torch.dtype] = None,
             filter_fn: Optional[FilterFn] = None, inplace: bool = False,
             autotune: Optional[Sequence[tuple]] = None, exact: bool = True) -> nn.Module:
    """Return ``model`` with every eligible ``nn.LSTM`` replaced by a ``PackedLSTM``, every
    ``nn.LSTMCell`` or ``nn.GRUCell`` by a ``PackedLSTMCell`` or ``PackedGRUCell`` and, with ``exact=False``,
    every ``nn.GRU`` or ``nn.RNN`` by a ``PackedGRU`` or ``PackedRNN``.

    Args:
        model: the model to optimize; copied first unless ``inplace=True``.
        dtype: None keeps each LSTM's dtype (bit-identical results). ``torch.bfloat16`` packs in bf16 for
            oneDNN and casts at the LSTM's boundary where the CPU has native bf16, and elsewhere runs the
            native kernel on bf16 weights; ``torch.int8`` runs each fp32 LSTM without a projection on the
            native kernel with int8 weights (``kernels.table.WEIGHTS_FORMATS``; on the native kernel the parameters
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
    request = Request(dtype, filter_fn, exact)
    if not inplace:
        try:
            model = tracked_copy(model)
        except Exception as exc:  # user models may hold uncopyable state (locks, files, ...)
            raise TypeError(f"cannot copy the model ({exc}); pass inplace=True") from exc
    handlers = [handler_for(model.get_submodule(d.name)) for d in decisions]  # before any swap
    for decision, handler in zip(decisions, handlers):
        if decision.packed:
            handler.convert(model, decision, request)
    if autotune is not None:
        from lstmopt.rewrite.autotune import autotune as tune

        tune(model, autotune, exact=exact)
    return model


def with_kernels(decisions: Sequence[Decision], optimized: nn.Module, *,
                 dtype: Optional[torch.dtype] = None) -> list[Decision]:
    """``decisions`` (from ``plan`` on the original model, for ``dtype``) updated with the kernels each packed module
    of ``optimized`` ended up with (after ``autotune``) and whether its results stay bit-identical."""
    updated = []
    for decision in decisions:
        if decision.packed:
            module = optimized.get_submodule(decision.name)
            handler = handler_for(module)
            decision = handler.with_kernels(decision, module) if handler is not None else decision
        updated.append(in_float32(decision, dtype))
    return updated
