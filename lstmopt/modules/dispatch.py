"""How a ``PackedLSTM`` call in Python reaches a kernel (the scripted counterpart is ``modules/scripted.py``).

``forward`` picks the route: torch.export records the op on the dense parameters (``exported``), code
inside ``torch.compile`` runs the eager route out of dynamo's sight, and eager calls go through
``dispatch``: a seqlock against a concurrent ``load_state_dict``, then ``dispatch_once``, which sends the
call to the kernel in use if ``guards.kernel_accepts`` lets it and the packs are current, and to
nn.LSTM's own path otherwise. The kernels themselves are in ``lstmopt/kernels``.
"""

import contextlib
import threading

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels.aten import run_cells, run_onednn, run_onednn_sequence
from lstmopt.modules.guards import aten_cell_call, kernel_accepts, plain_state
from lstmopt.modules.packs import weights_obstacle

__all__ = ["dispatch", "exported", "forward", "recording_dense_ops", "records_dense_ops", "seqlocked", "stock_only"]

# Looked up once: a one-step call spends ~25 us in the op, and each attribute lookup on torch._C adds up.
_tracing = torch._C._get_tracing_state
_autocast_enabled = torch._C._is_any_autocast_enabled
_mkldnn_enabled = torch._C._get_mkldnn_enabled
_grad_enabled = torch.is_grad_enabled
_dynamo_callback = torch._C._dynamo.eval_frame.get_eval_frame_callback
_dispatch_modes = torch._C._len_torch_dispatch_stack
_stock = nn.LSTM.forward


def forward(module, input, hx):
    """``PackedLSTM.forward`` outside TorchScript."""
    if torch.compiler.is_exporting():
        return with_io_casts(module, exported, input, hx)
    # Inside a torch.compile'd model: traced (torch._dynamo.config.allow_rnn) or run by its fallback
    if torch.compiler.is_compiling() or _dynamo_callback() is not None:
        return _eager_in_compiled_code(module, input, hx)
    return _eager(module, input, hx)


def _eager(module, input, hx):
    if module.io_dtype is not None:
        return with_io_casts(module, dispatch, input, hx)
    return dispatch(module, input, hx)


# Dynamo does not trace nn.LSTM modules (it falls back to eager for the frame that calls one), but it
# would try to compile every function this one calls, packs included: keep it out, so the packed path
# runs at its eager speed and new sequence lengths compile nothing.
_eager_in_compiled_code = torch.compiler.disable(_eager, recursive=True)


def with_io_casts(module, run, input, hx):
    """``run(module, input, hx)``, with inputs in ``io_dtype`` cast to the weights' dtype and results back."""
    weight_dtype = module._flat_weights[0].dtype
    data = input.data if isinstance(input, PackedSequence) else input
    if not isinstance(data, Tensor) or not module._casts_at_boundary(data.dtype, weight_dtype):
        return run(module, input, hx)
    if hx is not None:
        hx = (hx[0].to(weight_dtype), hx[1].to(weight_dtype))
    output, (h, c) = run(module, input.to(weight_dtype), hx)
    return output.to(module.io_dtype), (h.to(module.io_dtype), c.to(module.io_dtype))


def dispatch(module, input, hx):
    """One eager call (``seqlocked``)."""
    return seqlocked(module, dispatch_once, input, hx)


def seqlocked(module, once, input, hx):
    """``once(module, state, input, hx)``. The stock and cell paths compute on the parameters themselves,
    which load_state_dict overwrites in place one by one: a call that overlapped a load (the count moved,
    or is odd: a load is writing) is redone after it, so every call sees the old weights or the new ones,
    whole (a seqlock; calls served from packs are whole anyway, and pay two attribute reads)."""
    state = module._state
    me = threading.get_ident()
    while True:
        loads = state.loads
        if loads & 1 and state.loading_thread != me:
            with state.lock:  # wait for the load to finish
                continue
        result = once(module, state, input, hx)
        if state.loads == loads or state.loading_thread == me:
            return result


def stock_only(module) -> bool:
    """The eager guard of every packed module: whether a call must take the torch module's own path whatever
    its input. A tracer must record the stock op, not opaque constants; autocast would try to cast the
    packs. With autograd on, eager runs oneDNN's training primitive, whose last bits differ from the
    inference primitive's on some CPUs (AVX2): only nn.LSTM's own path gives its exact results then. Under
    a dispatch mode (FakeTensorMode, a functionalization or profiling mode) tensors may hold no data for the
    kernels to read. (Code being compiled is routed before, by each forward.)"""
    return _tracing() or _autocast_enabled() or _grad_enabled() or module.training or _dispatch_modes() > 0


def dispatch_once(module, state, input, hx):
    # An LSTM's exact kernel is oneDNN's: with mkldnn disabled, eager runs its native kernel instead.
    if stock_only(module) or not _mkldnn_enabled() or not plain_state(hx):
        return _stock(module, input, hx)
    kind = type(input)
    if kind is Tensor:
        kernel = module.kernel
        if kernel == "native":
            result = run_native(module, state, input, hx)
            if result is not None:
                return result
        elif kernel == "onednn" and _accepted(module, state, input, hx, module.kernel_dtype):
            return run_onednn(input, hx, state.kernel_args, module.hidden_size, module.bidirectional,
                              module.batch_first, module.bias,
                              state.zero_state(input, 3, module.batch_first, module.hidden_size))
        elif kernel == "cell" and kernel_accepts(module, input, hx, module.kernel_dtype, single_step_only=True):
            return run_cells(input, hx, module._flat_weights, module.input_size, module.hidden_size,
                             module.num_layers, module.bidirectional, module.batch_first, module.bias,
                             state.zero_state(input, 2, module.batch_first, module.hidden_size))
    elif kind is PackedSequence and _accepted(module, state, input, hx, module.sequence_dtype):
        return run_sequence(module, state, input, hx)
    return _stock(module, input, hx)


def _accepted(module, state, input, hx, dtype) -> bool:
    """The guard, then the packs: an in-place edit is repacked first, after which the call is judged
    again (the new weights may be ones the kernel cannot take)."""
    return (kernel_accepts(module, input, hx, dtype)
            and state.ready(module, lambda: kernel_accepts(module, input, hx, module.kernel_dtype
                                                           if type(input) is Tensor else module.sequence_dtype)))


def run_native(module, state, input: Tensor, hx):
    """The native kernel's result, or None where nn.LSTM's path must serve the call. The kernel's own
    checks (input, states, weights unchanged since packing) take nanoseconds; only when they refuse does
    Python look closer: packs made stale by an edit are remade, and the call tried again."""
    packs = state.native
    if packs is None:
        return None
    result = packs.try_forward(input, hx, module.batch_first, module._parameters)
    if result is None and _accepted(module, state, input, hx, module.kernel_dtype):
        packs = state.native  # packs just made: they serve this call even if the weights change again
        if packs is not None:
            h, c = (None, None) if hx is None else hx
            output, h_n, c_n = packs.forward(input, None, h, c, module.batch_first)
            return output, (h_n, c_n)
    return result


def run_sequence(module, state, input: PackedSequence, hx):
    data, batch_sizes, sorted_indices, _ = input
    if hx is not None:
        hx = module.permute_hidden(hx, sorted_indices)  # as nn.LSTM: the caller's order -> longest first
    if module.sequence_kernel == "native":
        h, c = (None, None) if hx is None else hx
        output, h_n, c_n = state.native.forward(data, batch_sizes, h, c, False)
    else:
        output, h_n, c_n = run_onednn_sequence(data, batch_sizes, hx, list(state.kernel_args), module.hidden_size,
                                               module.bidirectional, module.bias)
    return module._sequence_result(input, output, h_n, c_n)


_recording = threading.local()


@contextlib.contextmanager
def recording_dense_ops():
    """Inside, torch.export records for each LSTM (and native-kernel GRU) lstmopt's op on the dense
    parameters for the kernel it runs (``lstmopt/kernels/csrc/dense.cpp``: the op packs them on its first
    call, where the program runs), instead of the aten graph that runs at eager speed. Needs the native
    library loaded (``lstmopt.artifacts.program``)."""
    previous = getattr(_recording, "on", False)
    _recording.on = True
    try:
        yield
    finally:
        _recording.on = previous


def records_dense_ops() -> bool:
    return getattr(_recording, "on", False)


def exported(module, input, hx):
    """What torch.export records: one aten.mkldnn_rnn_layer per layer and direction on the dense
    parameters (the op lays them out itself, as eager does), which does not depend on the sequence
    length. Such a program holds no packs: it computes at eager speed, bit-identical to eager. Under
    ``recording_dense_ops``, lstmopt's dense op for the module's kernel instead."""
    # Export traces with fake tensors (tensor subclasses) and with mkldnn switched off; the op itself
    # runs whatever that flag says, so only what the op accepts is checked here. The weights are read by
    # name: export swaps the parameters, not the list _flat_weights holds, whose tensors it would record
    # as constants (a second copy, which the program's state dict would not change).
    if module.native_weights != "float32":  # a program would compute it in fp32: not what was asked for
        raise RuntimeError(f"a {module.native_weights} PackedLSTM on the native kernel cannot be exported "
                           "(torch.export, --format pt2/aoti): its weights live in the native kernel's packs; "
                           "save it as TorchScript or a pickle")
    weights = [getattr(module, name) for name in module._flat_weights_names]
    dtype = weights[0].dtype
    if (isinstance(input, PackedSequence) or module.training or _autocast_enabled()
            or weights_obstacle(module._flat_weights, dtype) is not None  # the real ones: not fake subclasses
            or not kernel_accepts(module, input, hx, dtype, exact_types=False)):
        return _stock(module, input, hx)
    if records_dense_ops() and dtype == torch.float32 and module.kernel != "stock":
        h, c = (None, None) if hx is None else hx
        sizes = (module.hidden_size, module.num_layers, module.bidirectional, module.batch_first, module.bias)
        if module.kernel == "native":
            output, h_n, c_n = torch.ops.lstmopt.lstm_dense(input, h, c, list(weights), *sizes, module.proj_size)
        else:  # onednn, and cell: its one-step calls are the oneDNN op's too, exactly
            output, h_n, c_n = torch.ops.lstmopt.onednn_lstm_dense(input, h, c, list(weights), *sizes)
        return output, (h_n, c_n)
    if module.proj_size > 0:
        return _stock(module, input, hx)
    per_layer = len(weights) // len(module.packed_layers)
    layers = []
    for i, layer in enumerate(module.packed_layers):
        w = weights[i * per_layer:(i + 1) * per_layer]
        empty = w[0].new_empty(0)
        layers.append((w[0], w[1], w[2] if module.bias else empty, w[3] if module.bias else empty, layer.reverse))
    return run_onednn(input, hx, layers, module.hidden_size, module.bidirectional, module.batch_first, module.bias)


_stock_cell = nn.LSTMCell.forward
_stock_gru_cell = nn.GRUCell.forward


def cell_forward(cell, input, hx):
    """``PackedLSTMCell.forward`` and ``PackedGRUCell.forward`` outside TorchScript: the native kernel where
    it serves the call (its own checks refuse anything the torch cell would treat otherwise), else ATen's
    cell op or the torch cell's own path, which also raises its errors. torch.compile and torch.export
    trace that path (a cell is a few ops they fuse)."""
    if torch.compiler.is_compiling() or stock_only(cell):
        return _stock_cell_of(cell)(cell, input, hx)
    packs = cell._state.native
    if packs is not None:
        result = packs.try_cell(input, hx, cell._parameters)
        if result is not None:
            return result
    return seqlocked(cell, _cell_once, input, hx)


def _stock_cell_of(cell):
    return _stock_gru_cell if isinstance(cell, nn.GRUCell) else _stock_cell


def _cell_once(cell, state, input, hx):
    gru = isinstance(cell, nn.GRUCell)
    if cell.kernel == "aten" and aten_cell_call(input, hx, gru):
        # What the torch cell's forward does for a batch, less its Python: the same op on the same tensors,
        # so the same results and, for a bad shape or dtype, the op's own error.
        p = cell._parameters
        if gru:
            h = state.zero_state(input, 2, False, cell.hidden_size, batch=input.size(0)) if hx is None else hx
            return _VF.gru_cell(input, h, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
        if hx is None:
            zeros = state.zero_state(input, 2, False, cell.hidden_size, batch=input.size(0))
            hx = (zeros, zeros)
        return _VF.lstm_cell(input, hx, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    # The native packs refused: an in-place edit made them stale (repack, and try again), or the call is
    # one for the torch cell (other dtypes, shapes, tensor subclasses).
    if state.native is not None and state.is_current(cell._parameters) is False and state.ready(cell, lambda: True):
        packs = state.native
        result = None if packs is None else packs.try_cell(input, hx, cell._parameters)
        if result is not None:
            return result
    return _stock_cell_of(cell)(cell, input, hx)
