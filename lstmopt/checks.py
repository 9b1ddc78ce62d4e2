"""What a fast kernel may be given: the checks that keep every input the op cannot take away from it.

The op checks almost nothing (non-contiguous input is silently wrong, B=0 kills the process, T=0 returns
garbage, a wrong size reads out of bounds), so a call reaches a fast kernel only when every argument is
positively known to be valid for it. Anything else takes nn.LSTM's own path, which computes the stock
result or raises the stock error. TorchScript-compatible: the scripted dispatch runs the same checks.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["valid_for_kernel"]


def _plain_cpu(t: Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.is_cpu and t.layout == torch.strided and not t.is_neg()


def valid_for_kernel(
    input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], dtype: Optional[torch.dtype], input_size: int,
    hidden_size: int, states: int, batch_first: bool, single_step_only: bool,
) -> bool:
    """Device, dtype, layout and every shape a fast kernel would trust without checking. ``dtype``: what
    the kernel computes in (None: no fast kernel can run); ``states``: num_layers x directions."""
    if dtype is None or not _plain_cpu(input, dtype):
        return False
    shape = input.shape
    if len(shape) == 3:
        batch, steps = (shape[0], shape[1]) if batch_first else (shape[1], shape[0])
    elif len(shape) == 2:
        batch, steps = 1, shape[0]
    else:
        return False
    if steps == 0 or batch == 0 or shape[-1] != input_size:
        return False
    if single_step_only and steps != 1:
        return False
    if hx is not None:
        expected = [states, batch, hidden_size] if len(shape) == 3 else [states, hidden_size]
        for state in hx:
            if not _plain_cpu(state, dtype) or list(state.shape) != expected:
                return False
    return True
