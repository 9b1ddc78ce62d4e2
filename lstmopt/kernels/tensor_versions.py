"""Whether a tensor is the one a pack was made from, unchanged since: data pointers and version counters.

TorchScript-compatible (the pack classes compile them): where TorchScript cannot read a data pointer, only
version counters are compared.
"""

# No "from __future__ import annotations": TorchScript compiles these functions.
from typing import List

import torch
from torch import Tensor

__all__ = ["sources_of", "unchanged_since", "version_of"]


def version_of(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place change), or -1 for an inference tensor, which
    has none: such a tensor can only change inside ``torch.inference_mode()``, where nothing can see it."""
    if t.is_inference():
        return -1
    if torch.jit.is_scripting():
        return torch.ops.aten._version(t)
    return t._version


def _address(t: Tensor) -> int:
    """Where ``t``'s data lives (``.data =`` moves it without a version bump); 0 in TorchScript."""
    if torch.jit.is_scripting():
        return 0
    return t.data_ptr()


def sources_of(tensors: List[Tensor]) -> List[int]:
    """Data pointer (0 in TorchScript, which cannot read it) and version of each tensor."""
    sources: List[int] = []
    for t in tensors:
        sources.append(_address(t))
        sources.append(version_of(t))
    return sources


def unchanged_since(sources: List[int], tensors: List[Tensor]) -> bool:
    """Whether ``tensors`` are the very tensors ``sources`` (``sources_of``) recorded, unchanged since."""
    current = sources_of(tensors)
    if not torch.jit.is_scripting():
        return current == sources
    # TorchScript cannot read data pointers: there, only in-place changes (versions) are seen.
    if len(current) != len(sources):
        return False
    for i in range(1, len(current), 2):
        if current[i] != sources[i]:
            return False
    return True
