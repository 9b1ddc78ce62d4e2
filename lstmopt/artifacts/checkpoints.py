"""Finding the model's state dict inside a training checkpoint.

Checkpoints rarely hold a bare state dict: ``{"epoch": 3, "state_dict": ...}`` (Lightning),
``{"model": ..., "optimizer": ..., "ema": ...}``, ``{"model_state_dict": ...}``, with keys prefixed by a
wrapper (``module.`` from DistributedDataParallel, ``model.`` from a LightningModule, ``_orig_mod.`` from
torch.compile). ``find_state_dict`` looks at every mapping of tensors in the checkpoint, strips a prefix
shared by all of a candidate's keys when that makes them fit the model, and keeps the one candidate that
fits; several that fit (a model and its EMA) are ambiguous, and the error lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lstmopt.errors import UsageError

__all__ = ["StateDictChoice", "find_state_dict"]

_MAX_DEPTH = 3  # {"model": {"state_dict": {...}}} is as deep as checkpoints go in practice


@dataclass(frozen=True)
class StateDictChoice:
    state: Mapping[str, Any]
    key: Optional[str]  # where it was in the checkpoint (dots for nested keys); None: the whole file
    prefix: Optional[str]  # stripped from every key; None: none

    def describe(self) -> str:
        where = f"the checkpoint's {self.key!r} entry" if self.key else "the file itself"
        return where + (f", keys without the prefix {self.prefix!r}" if self.prefix else "")


def _is_tensor_mapping(value: Any) -> bool:
    import torch

    return (isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def _candidates(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, Mapping[str, Any]]]:
    """Every mapping of tensors in ``obj`` with its dotted path ("" for ``obj`` itself)."""
    if _is_tensor_mapping(obj):
        return [(path, obj)]
    found = []
    if isinstance(obj, Mapping) and depth < _MAX_DEPTH:
        for key, value in obj.items():
            if isinstance(key, str):
                found += _candidates(value, f"{path}.{key}" if path else key, depth + 1)
    return found


def _strip(state: Mapping[str, Any], prefix: str) -> Optional[dict[str, Any]]:
    if not all(key.startswith(prefix) for key in state):
        return None
    return {key[len(prefix):]: value for key, value in state.items()}


def _shared_prefixes(keys) -> list[str]:
    """The dotted prefixes every key shares, shortest first: ``module.``, ``module.model.``, ..."""
    split = [key.split(".") for key in keys]
    prefixes, depth = [], 0
    while all(len(parts) > depth + 1 for parts in split) and len({parts[depth] for parts in split}) == 1:
        depth += 1
        prefixes.append(".".join(split[0][:depth]) + ".")
    return prefixes


def _fit(state: Mapping[str, Any], expected: set[str], prefix: Optional[str]) -> Optional[tuple[dict, Optional[str]]]:
    """The state with keys that fit ``expected`` (after stripping ``prefix``, or a shared prefix found
    here when None), and the prefix stripped; None if it cannot be made to fit."""
    if prefix is not None:
        stripped = _strip(state, prefix)
        return (stripped, prefix) if stripped is not None and set(stripped) == expected else None
    if set(state) == expected:
        return dict(state), None
    for shared in _shared_prefixes(state):
        stripped = _strip(state, shared)
        if set(stripped) == expected:
            return stripped, shared
    return None


def _resolve(obj: Any, key: str) -> Any:
    value = obj
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _listing(candidates) -> str:
    return ", ".join(f"{path or '<the file itself>'} ({len(state)} tensors)" for path, state in candidates)


def find_state_dict(checkpoint: Any, expected: set[str], *, key: Optional[str] = None,
                    prefix: Optional[str] = None) -> StateDictChoice:
    """The state dict in ``checkpoint`` whose keys fit ``expected`` (the model's own state-dict keys).
    ``key`` names the entry to use (dots for nested keys) and ``prefix`` the prefix to strip, for the cases
    the search cannot settle; UsageError when nothing fits or more than one entry does."""
    candidates = _candidates(checkpoint)
    if key is not None:
        value = _resolve(checkpoint, key)
        if not _is_tensor_mapping(value):
            found = _listing(candidates) or "none"
            raise UsageError(f"the checkpoint has no mapping of tensors at {key!r} (--state-dict-key); "
                             f"mappings of tensors found: {found}")
        candidates = [(key, value)]
    if not candidates:
        raise UsageError("it holds no mapping of parameter names to tensors (a state dict)")
    fitting = []
    for path, state in candidates:
        fit = _fit(state, expected, prefix)
        if fit is not None:
            fitting.append(StateDictChoice(fit[0], path or None, fit[1]))
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        names = ", ".join(repr(choice.key or "<the file itself>") for choice in fitting)
        raise UsageError(f"it holds several state dicts that fit the model ({names}); choose one with "
                         "--state-dict-key KEY")
    path, state = max(candidates, key=lambda item: len(set(item[1]) & expected))
    raise _misfit(path, state, expected, prefix, len(candidates))


def _misfit(path: str, state: Mapping[str, Any], expected: set[str], prefix: Optional[str],
            count: int) -> UsageError:
    given = set(_strip(state, prefix) or state) if prefix else set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    parts = []
    if missing:
        parts.append(f"missing keys: {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_first(unexpected)}")
    where = f" (closest of {count} candidates: {path or 'the file itself'})" if count > 1 else (
        f" (at {path!r})" if path else "")
    return UsageError(f"its weights do not fit the model{where}: " + "; ".join(parts) + _prefix_hint(given, expected,
                                                                                                   prefix))


def _prefix_hint(given: set[str], expected: set[str], prefix: Optional[str]) -> str:
    """What would make the keys fit, where a prefix is the difference."""
    for shared in _shared_prefixes(expected):  # the model's keys carry a prefix the checkpoint's lack
        if {key[len(shared):] for key in expected} == given:
            inner = shared.rstrip(".")
            return (f"; the model's keys all start with {shared!r}, which the checkpoint's lack: the factory builds a "
                    f"wrapper around the module these weights belong to; pass a factory that returns that module "
                    f"(the wrapper's .{inner}) instead")
    if prefix:
        return ""
    shared = _shared_prefixes(given)
    if shared:
        return f"; its keys all start with {shared[0]!r}: if that is not part of the model's names, pass --strip-prefix"
    return "; if its keys carry a prefix, strip it with --strip-prefix PREFIX"


def _first(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
