"""What a fast kernel may be given: the checks that keep every input the op cannot take away from it.

The op checks almost nothing (non-contiguous input is silently wrong, B=0 kills the process, T=0 returns
garbage, a wrong size reads out of bounds), so a call reaches a fast kernel only when every argument is
positively known to be valid for it. Anything else takes nn.LSTM's own path, which computes the stock
result or raises the stock error. TorchScript-compatible: the scripted dispatch runs the same checks.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

__all__ = ["inference_call", "kernel_accepts", "plain_state", "valid_cell", "valid_for_kernel", "valid_sequence"]


def inference_call(training: bool) -> bool:
    """The scripted modules' guard before any fast kernel: an inference call (eval mode, no autograd, no
    autocast); the rest takes the torch module's own path. TorchScript; eager calls are judged in
    ``dispatch`` (``stock_only``), which also sees tracers and dispatch modes."""
    return not training and not torch.is_grad_enabled() and not torch.is_autocast_cpu_enabled()


def _plain_cpu(t: Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.is_cpu and t.layout == torch.strided and not t.is_neg()


def valid_for_kernel(
    input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], dtype: Optional[torch.dtype], input_size: int,
    hidden_size: int, states: int, batch_first: bool, single_step_only: bool, proj_size: int = 0,
) -> bool:
    """Device, dtype, layout and every shape a fast kernel would trust without checking. ``dtype``: what
    the kernel computes in (None: no fast kernel can run); ``states``: num_layers x directions;
    ``proj_size``: the hidden state's size where it is not ``hidden_size`` (LSTMP)."""
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
        lead = [states, batch] if len(shape) == 3 else [states]
        return _states_shaped(hx, dtype, lead, hidden_size, proj_size)
    return True


def _states_shaped(hx: Tuple[Tensor, Tensor], dtype: torch.dtype, lead: List[int], hidden_size: int,
                   proj_size: int) -> bool:
    """(h, c) plain, of ``dtype``, shaped lead + [proj_size or hidden_size] and lead + [hidden_size]."""
    h, c = hx
    h_size = proj_size if proj_size > 0 else hidden_size
    return (_plain_cpu(h, dtype) and _plain_cpu(c, dtype) and list(h.shape) == lead + [h_size]
            and list(c.shape) == lead + [hidden_size])


def valid_cell(input: Tensor, states: List[Tensor], input_size: int, hidden_size: int) -> bool:
    """The same for one ``nn.LSTMCell`` or ``nn.GRUCell`` step on the native kernel (float32): input (B, I)
    or (I,), ``states`` (none, an LSTMCell's h and c, or a GRUCell's h) (B, H) or (H,) to match."""
    if not _plain_cpu(input, torch.float32) or input.size(-1) != input_size:
        return False
    if input.dim() == 2:
        expected = [input.size(0), hidden_size]
        if input.size(0) == 0:
            return False
    elif input.dim() == 1:
        expected = [hidden_size]
    else:
        return False
    for state in states:
        if not _plain_cpu(state, torch.float32) or list(state.shape) != expected:
            return False
    return True


def aten_cell_call(input: Tensor, hx, gru: bool) -> bool:
    """Whether a packed cell's ``aten`` kernel takes this call itself: a plain CPU batch (B, I) with no
    state or (B, H) states (an LSTMCell's pair, a GRUCell's one), as the torch cell passes them to the op;
    the rest (unbatched steps, tensor subclasses) takes the torch cell's path. Python only."""
    if type(input) is not Tensor or input.dim() != 2 or not input.is_cpu:
        return False
    if hx is None:
        return True
    if gru:
        return type(hx) is Tensor and hx.dim() == 2
    return plain_state(hx) and hx[0].dim() == 2 and hx[1].dim() == 2


def _index_vector(t: Optional[Tensor], batch: int) -> bool:
    return t is not None and t.dim() == 1 and t.dtype == torch.int64 and t.is_cpu and t.numel() == batch


def valid_sequence(
    data: Tensor, batch_sizes: Tensor, sorted_indices: Optional[Tensor], unsorted_indices: Optional[Tensor],
    hx: Optional[Tuple[Tensor, Tensor]], dtype: Optional[torch.dtype], input_size: int, hidden_size: int,
    states: int, proj_size: int = 0,
) -> bool:
    """The same for a PackedSequence, whose parts the kernel indexes with: the data, batch sizes that are
    positive, non-increasing and add up to the data's rows, index vectors that undo each other."""
    if dtype is None or data.dim() != 2 or not _plain_cpu(data, dtype) or data.size(1) != input_size:
        return False
    if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or not batch_sizes.is_cpu or batch_sizes.numel() == 0:
        return False
    sizes: List[int] = batch_sizes.tolist()
    if sizes[-1] < 1 or sum(sizes) != data.size(0):
        return False
    for t in range(1, len(sizes)):
        if sizes[t] > sizes[t - 1]:
            return False
    batch = sizes[0]
    if sorted_indices is not None or unsorted_indices is not None:
        if not _index_vector(sorted_indices, batch) or not _index_vector(unsorted_indices, batch):
            return False
        assert sorted_indices is not None and unsorted_indices is not None
        if int(sorted_indices.min()) < 0 or int(sorted_indices.max()) >= batch:
            return False
        if not torch.equal(unsorted_indices.index_select(0, sorted_indices), torch.arange(batch)):
            return False
    if hx is not None:
        return _states_shaped(hx, dtype, [states, batch], hidden_size, proj_size)
    return True


def plain_state(hx, exact_types: bool = True) -> bool:
    """None, or a pair of tensors (``exact_types``: plain ``Tensor``s, no subclass) as the kernels take
    them; anything else is nn.LSTM's to judge. Python only."""
    if hx is None:
        return True
    return isinstance(hx, (tuple, list)) and len(hx) == 2 and _is_tensor(hx[0], exact_types) and _is_tensor(
        hx[1], exact_types)


def kernel_accepts(module, input, hx, dtype: Optional[torch.dtype], *, single_step_only: bool = False,
                   exact_types: bool = True) -> bool:
    """The one check between a ``PackedLSTM`` call and a fast kernel (Python; the scripted mirror runs its
    two halves, ``valid_for_kernel`` and ``valid_sequence``).

    Args:
        module: the ``PackedLSTM`` whose sizes the input must match.
        input: a tensor or a ``PackedSequence``; hx: None or the (h_0, c_0) pair.
        dtype: what the kernel computes in (None: no fast kernel can run).
        single_step_only: the kernel serves one time step per call (``cell``).
        exact_types: refuse tensor subclasses (eager calls; torch.export passes fake tensors).

    Example:
        >>> kernel_accepts(lstm, torch.randn(5, 2, lstm.input_size), None, torch.float32)
        True
    """
    if not plain_state(hx, exact_types):
        return False
    states = module.num_layers * (2 if module.bidirectional else 1)
    if isinstance(input, PackedSequence):
        return _is_tensor(input.data, exact_types) and valid_sequence(
            input.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices, hx, dtype,
            module.input_size, module.hidden_size, states, module.proj_size)
    return _is_tensor(input, exact_types) and valid_for_kernel(
        input, hx, dtype, module.input_size, module.hidden_size, states, module.batch_first, single_step_only,
        module.proj_size)


def _is_tensor(t, exact: bool) -> bool:
    return type(t) is Tensor if exact else isinstance(t, Tensor)
