"""``PackedLSTM``: an ``nn.LSTM`` whose weights are laid out for oneDNN once instead of on every call.

Eager ``nn.LSTM`` on CPU already runs oneDNN's LSTM primitive, but it reorders every weight matrix into
the primitive's blocked layout on every call. ``PackedLSTM`` is an ``nn.LSTM`` (same parameters, names,
``state_dict`` and errors) that also holds one ``PackedLayer`` per layer and direction with those weights
packed by ``mkldnn._reorder_mkldnn_rnn_layer_weight``, and runs ``aten.mkldnn_rnn_layer`` on them: the
decomposition inductor uses (PR #103071), without compiling.

The op checks almost nothing (non-contiguous input is silently wrong, B=0 kills the process, ...), so a
call takes the packed kernel only when every argument is positively known to be valid for it; anything
else goes through ``nn.LSTM.forward`` itself, which computes the stock result or raises the stock error.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
import copy
import threading
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["PackedLSTM", "PackedLayer", "packing_obstacle", "PACKABLE_DTYPES"]

# Looked up once: a one-step call spends ~25 us in the op, and each attribute lookup on torch._C adds up.
_tracing = torch._C._get_tracing_state
_autocast_enabled = torch._C._is_any_autocast_enabled
_mkldnn_enabled = torch._C._get_mkldnn_enabled
_grad_enabled = torch.is_grad_enabled

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def bf16_supported() -> bool:
    """Whether this CPU runs oneDNN bf16 natively (emulated bf16 is slower than fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _weights_obstacle(weights: List[Tensor]) -> Optional[str]:
    """Why these (current) LSTM weights cannot be packed, or None if they can."""
    devices = {w.device for w in weights}
    if devices != {torch.device("cpu")}:
        where = ", ".join(sorted(str(d) for d in devices))
        return f"weights are on {where}; oneDNN packing is CPU-only"
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1:
        return "weights have mixed dtypes " + ", ".join(sorted(str(d) for d in dtypes))
    dtype = dtypes.pop()
    if dtype not in PACKABLE_DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')} is not supported by the packed kernel (float32, bfloat16)"
    if dtype == torch.bfloat16 and not bf16_supported():
        return "this CPU has no native bf16 support in oneDNN"
    if any(type(w) is not nn.Parameter and type(w) is not Tensor for w in weights):
        return "weights are tensor subclasses"
    return None


def packing_obstacle(lstm: nn.Module, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why ``lstm`` (converted to ``dtype`` if given) cannot become a ``PackedLSTM``, or None if it can."""
    if not isinstance(lstm, nn.LSTM):
        return f"{type(lstm).__name__} is not an nn.LSTM"
    if type(lstm) is not nn.LSTM and type(lstm) is not PackedLSTM:
        return f"{type(lstm).__qualname__} subclasses nn.LSTM; its own code would be bypassed"
    if lstm.proj_size > 0:
        return "proj_size>0 is not supported by oneDNN"
    if lstm.input_size == 0 or lstm.hidden_size == 0:
        return "input_size or hidden_size is 0"
    computed = [name for name in lstm._flat_weights_names if name not in lstm._parameters]
    if computed:  # e.g. torch.nn.utils.weight_norm recomputes the weight in a forward pre-hook
        return f"{computed[0]} is not a parameter (computed by a hook such as weight_norm)"
    weights = [getattr(lstm, name) for name in lstm._flat_weights_names]
    if dtype is not None:
        if dtype not in PACKABLE_DTYPES:
            return f"dtype {str(dtype).replace('torch.', '')} is not supported by the packed kernel (float32, bfloat16)"
        weights = [w.detach().to(dtype) if w.is_floating_point() else w for w in weights]
    return _weights_obstacle(weights)


class PackedLayer(nn.Module):
    """One layer in one direction: its dense weights (views of the parent's parameters) and their packs.

    The packs are opaque oneDNN tensors whose layout depends on the CPU, so they are never serialized:
    ``__getstate__`` keeps the dense weights and ``__setstate__`` packs again on the loading machine. In
    TorchScript the state is a tuple assigned field by field, which is why every field has a fixed name.
    """

    hidden_size: int
    reverse: bool
    has_biases: bool

    def __init__(self, hidden_size: int, reverse: bool, has_biases: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.reverse = reverse
        self.has_biases = has_biases
        self.release()

    @torch.jit.export
    def pack(self, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> None:
        self.weight_ih = weight_ih
        self.weight_hh = weight_hh
        # Unused when has_biases is False, but the op still needs tensors of the weights' dtype.
        self.bias_ih = bias_ih
        self.bias_hh = bias_hh
        packed = torch.ops.mkldnn._reorder_mkldnn_rnn_layer_weight(
            weight_ih, weight_hh, self.hidden_size, self.reverse, self.has_biases, False
        )
        self.packed_ih = packed[0]
        self.packed_hh = packed[1]

    @torch.jit.export
    def release(self) -> None:
        empty = torch.empty(0)
        self.weight_ih = empty
        self.weight_hh = empty
        self.bias_ih = empty
        self.bias_hh = empty
        self.packed_ih = empty
        self.packed_hh = empty

    def forward(self, input: Tensor, hx: Tensor, cx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One layer over a contiguous time-major (T, B, I) input with contiguous (B, H) states."""
        # mode 2 is ideep::rnn_kind::LSTM; the op runs one layer, one direction, time-major, inference.
        out = torch.mkldnn_rnn_layer(
            input, self.packed_ih, self.packed_hh, self.bias_ih, self.bias_hh, hx, cx,
            self.reverse, [], 2, self.hidden_size, 1, self.has_biases, False, False, False,
        )
        return out[0], out[1], out[2]

    @torch.jit.export
    def __getstate__(self):
        if torch.jit.is_scripting():
            return (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                    self.hidden_size, self.reverse, self.has_biases, self.training)
        # Python pickling: the parent owns the dense weights and packs again after unpickling.
        state = self.__dict__.copy()
        empty = torch.empty(0)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "packed_ih", "packed_hh"):
            state[name] = empty
        return state

    @torch.jit.export
    def __setstate__(self, state: Tuple[Tensor, Tensor, Tensor, Tensor, int, bool, bool, bool]) -> None:
        if torch.jit.is_scripting():
            self.hidden_size = state[4]
            self.reverse = state[5]
            self.has_biases = state[6]
            self.training = state[7]
            self.release()
            if state[0].numel() > 0:
                self.pack(state[0], state[1], state[2], state[3])
            return
        self.__dict__.update(state)

    def extra_repr(self) -> str:
        direction = "reverse" if self.reverse else "forward"
        layout = "packed" if self.packed_ih.numel() > 0 else "released"
        return f"hidden_size={self.hidden_size}, {direction}, {layout}"


class PackedLSTM(nn.LSTM):
    """Drop-in ``nn.LSTM`` that runs inference on weights packed once for oneDNN.

    Build one with ``PackedLSTM.from_lstm(lstm)`` (a copy), ``PackedLSTM(input_size, hidden_size, ...)``
    (like ``nn.LSTM``), or ``lstmopt.optimize(model)``. fp32 results are bit-identical to ``nn.LSTM``.
    The packed kernel is used for CPU tensors in the packed dtype in eval mode without autograd; every
    other call (training, grad, PackedSequence, autocast, other dtypes or devices, invalid input) runs
    ``nn.LSTM.forward`` unchanged.

    ``io_dtype``: when set (``optimize(dtype=torch.bfloat16)`` sets it to float32), inputs arriving in
    ``io_dtype`` are cast to the weights' dtype and results cast back, so a bf16 LSTM can sit inside an
    fp32 model.
    """

    # Python-only bookkeeping; a scripted module cannot observe tensor versions anyway.
    __jit_ignored_attributes__ = ["_packed_from", "_pack_lock", "_zeros", "_kernel_args"]
    __jit_unused_properties__ = ["packed_layers", *nn.LSTM.__jit_unused_properties__]

    packed_dtype: Optional[torch.dtype]
    io_dtype: Optional[torch.dtype]

    def __init__(self, *args, io_dtype: Optional[torch.dtype] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        obstacle = packing_obstacle(self)
        if obstacle is not None:
            raise ValueError(f"cannot pack this LSTM: {obstacle}")
        self._init_packing(io_dtype)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, dtype: Optional[torch.dtype] = None) -> "PackedLSTM":
        """A ``PackedLSTM`` with a copy of ``lstm``'s weights (converted to ``dtype`` if given)."""
        return cls.convert_(copy.deepcopy(lstm), dtype)

    @classmethod
    def convert_(cls, lstm: nn.LSTM, dtype: Optional[torch.dtype] = None) -> "PackedLSTM":
        """Turn ``lstm`` itself into a ``PackedLSTM``, keeping its parameters, hooks and identity.

        Changing the class in place (as ``torch.nn.utils.parametrize`` does) keeps every reference to the
        module valid, so an LSTM shared by two parents stays one shared module.
        """
        obstacle = packing_obstacle(lstm, dtype)
        if obstacle is not None:
            raise ValueError(f"cannot pack this LSTM: {obstacle}")
        current = lstm._flat_weights[0].dtype
        io_dtype = getattr(lstm, "io_dtype", None)
        if dtype is not None and dtype != current:
            io_dtype = io_dtype or current
            lstm.to(dtype)  # before the class changes, so the weights are packed once
        if type(lstm) is cls:
            lstm.io_dtype = io_dtype
        else:
            lstm.__class__ = cls
            lstm._init_packing(io_dtype)
        return lstm

    def _init_packing(self, io_dtype: Optional[torch.dtype]) -> None:
        self.io_dtype = io_dtype
        self.packed_dtype = None
        self._pack_lock = threading.Lock()
        self._packed_from: List[Tuple[str, Tensor, int, int]] = []
        directions = 2 if self.bidirectional else 1
        self.packed_layers = nn.ModuleList(
            PackedLayer(self.hidden_size, reverse=d == 1, has_biases=self.bias)
            for _ in range(self.num_layers) for d in range(directions)
        )
        self.repack()

    @property
    def packed_layers(self) -> nn.ModuleList:
        """One ``PackedLayer`` per layer and direction, in ``nn.LSTM`` order (l0, l0_reverse, l1, ...)."""
        # nn.Module.__getattr__ costs ~0.6 us per lookup, 2% of a one-step call; scripted code sees the
        # registered submodule directly.
        return self._modules["packed_layers"]

    # ---------------------------------------------------------------------------------------------
    # Keeping the packs in step with the parameters

    def repack(self) -> None:
        """Pack the current weights again (done automatically after every change lstmopt can see)."""
        with self._pack_lock:
            names = self._flat_weights_names
            weights = [getattr(self, name) for name in names]
            obstacle = _weights_obstacle(weights)
            per_layer = len(names) // len(self.packed_layers)
            for i, layer in enumerate(self.packed_layers):
                if obstacle is not None:
                    layer.release()
                    continue
                w = [t.detach() for t in weights[i * per_layer:(i + 1) * per_layer]]
                if not self.bias:
                    w += [torch.empty(0, dtype=w[0].dtype)] * 2
                with torch.no_grad():
                    layer.pack(w[0], w[1], w[2], w[3])
            self.packed_dtype = None if obstacle is not None else weights[0].dtype
            self._zeros = torch.empty(0, 0)
            self._kernel_args = tuple(
                (layer.packed_ih, layer.packed_hh, layer.bias_ih, layer.bias_hh, layer.reverse)
                for layer in self.packed_layers
            )
            self._packed_from = [(n, w, w._version, w.data_ptr()) for n, w in zip(names, weights)]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.repack()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.repack()

    def __getstate__(self):
        state = super().__getstate__()
        for name in self.__jit_ignored_attributes__:  # locks, packs and caches are rebuilt on load
            del state[name]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._pack_lock = threading.Lock()
        self.repack()

    # ---------------------------------------------------------------------------------------------
    # Forward

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method
    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]: ...

    def forward(self, input, hx=None):
        if not torch.jit.is_scripting():
            if self.io_dtype is not None and self._casts_at_boundary(_dtype_of(input)):
                weight_dtype = self._flat_weights[0].dtype
                if hx is not None:
                    hx = (hx[0].to(weight_dtype), hx[1].to(weight_dtype))
                output, (h, c) = self.forward(input.to(weight_dtype), hx)
                return output.to(self.io_dtype), (h.to(self.io_dtype), c.to(self.io_dtype))
            if not self._kernel_ready(input, hx):
                return super().forward(input, hx)
            if _grad_enabled():  # nothing requires grad here: skip the training primitive
                with torch.no_grad():
                    return self._run_kernel(input, hx)
            return self._run_kernel(input, hx)

        # TorchScript cannot call super().forward, so the scripted dispatch spells out the stock paths.
        if isinstance(input, PackedSequence):
            data = input.data
            if self._casts_at_boundary(data.dtype):
                weight_dtype = self._flat_weights[0].dtype
                cast = PackedSequence(data.to(weight_dtype), input.batch_sizes,
                                      input.sorted_indices, input.unsorted_indices)
                out, hidden = self._scripted_stock_packed(cast, _cast_hidden(hx, weight_dtype))
                out = PackedSequence(out.data.to(data.dtype), out.batch_sizes,
                                     out.sorted_indices, out.unsorted_indices)
                return out, (hidden[0].to(data.dtype), hidden[1].to(data.dtype))
            return self._scripted_stock_packed(input, hx)
        else:
            if self._casts_at_boundary(input.dtype):
                weight_dtype = self._flat_weights[0].dtype
                output, hidden = self._scripted_forward_tensor(input.to(weight_dtype),
                                                               _cast_hidden(hx, weight_dtype))
                return output.to(input.dtype), (hidden[0].to(input.dtype), hidden[1].to(input.dtype))
            return self._scripted_forward_tensor(input, hx)

    def _kernel_ready(self, input, hx) -> bool:
        """True when the packed kernel computes exactly what ``nn.LSTM.forward`` would for this call,
        in which case the packs are brought up to date with the weights first."""
        # A tracer must record the stock op, not opaque constants; autocast would try to cast the packs;
        # with mkldnn disabled, eager runs its native kernel.
        if _tracing() or _autocast_enabled() or not _mkldnn_enabled():
            return False
        if type(input) is not Tensor:  # PackedSequence, tensor subclasses
            return False
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                return False
            if type(hx[0]) is not Tensor or type(hx[1]) is not Tensor:
                return False
        if not self._valid_for_kernel(input, hx):
            return False
        if _grad_enabled() and _any_requires_grad(input, hx, self._flat_weights):
            return False
        # In-place edits bump the version counter, ``.data =`` moves the data, and reassignment
        # (or torch.func.functional_call) swaps the Parameter object; each invalidates the packs.
        params = self._parameters
        for name, weight, version, ptr in self._packed_from:
            current = params[name]
            if current is not weight or current._version != version or current.data_ptr() != ptr:
                self.repack()
                return self._valid_for_kernel(input, hx)  # the dtype may have changed with the weights
        return True

    def _valid_for_kernel(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> bool:
        """Device, dtype, layout and every shape the op would trust without checking."""
        dtype = self.packed_dtype
        if dtype is None or self.training:
            return False
        if input.dtype != dtype or not input.is_cpu or input.layout != torch.strided or input.is_neg():
            return False
        shape = input.shape
        if len(shape) == 3:
            batch, steps = (shape[0], shape[1]) if self.batch_first else (shape[1], shape[0])
        elif len(shape) == 2:
            batch, steps = 1, shape[0]
        else:
            return False
        if steps == 0 or batch == 0 or shape[-1] != self.input_size:
            return False
        if hx is not None:
            states = self.num_layers * (2 if self.bidirectional else 1)
            expected = [states, batch, self.hidden_size] if len(shape) == 3 else [states, self.hidden_size]
            for state in hx:
                if state.dtype != dtype or not state.is_cpu or state.layout != torch.strided or state.is_neg():
                    return False
                if list(state.shape) != expected:
                    return False
        return True

    def _run_kernel(self, input: Tensor, hx):
        """The packed computation, in Python. A one-step call costs ~25 us in the op, so lstmopt's own
        work is kept to a few hundred ns: op arguments come ready-made from ``_kernel_args`` and the
        common single-layer case skips the bookkeeping of the layer loop."""
        batched = input.dim() == 3
        # The op reads dim 0 as time and trusts the memory to be dense: give it exactly that.
        if batched:
            x = (input.transpose(0, 1) if self.batch_first else input).contiguous()
        else:
            x = input.unsqueeze(1).contiguous()
        hidden_size, has_biases, kernel_args = self.hidden_size, self.bias, self._kernel_args
        # States go in as (1, B, H) so the op's (1, B, H) results need no reshaping.
        if hx is None:
            # The op only reads its state inputs, so one cached zero state serves every call (repack
            # resets it, and the input's dtype is the packed one).
            zeros, batch = self._zeros, x.size(1)
            if zeros.size(1) != batch:
                zeros = self._zeros = torch.zeros(1, batch, hidden_size, dtype=x.dtype)
            h0 = c0 = (zeros,) * len(kernel_args)
        else:
            h, c = hx
            if not batched:
                h, c = h.unsqueeze(1), c.unsqueeze(1)
            h0, c0 = h.contiguous().split(1), c.contiguous().split(1)

        if len(kernel_args) == 1:
            w_ih, w_hh, b_ih, b_hh, reverse = kernel_args[0]
            x, h_n, c_n, _ = torch.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0[0], c0[0], reverse, [], 2,
                                                    hidden_size, 1, has_biases, False, False, False)
        else:
            hs, cs, directions = [], [], 2 if self.bidirectional else 1
            for i in range(0, len(kernel_args), directions):
                outs = []
                for j in range(i, i + directions):
                    w_ih, w_hh, b_ih, b_hh, reverse = kernel_args[j]
                    y, hy, cy, _ = torch.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0[j], c0[j], reverse, [],
                                                          2, hidden_size, 1, has_biases, False, False, False)
                    outs.append(y)
                    hs.append(hy)
                    cs.append(cy)
                x = outs[0] if directions == 1 else torch.cat(outs, 2)
            h_n, c_n = torch.cat(hs), torch.cat(cs)

        if not batched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    # ---------------------------------------------------------------------------------------------
    # TorchScript only

    def _casts_at_boundary(self, dtype: torch.dtype) -> bool:
        io_dtype = self.io_dtype
        return io_dtype is not None and dtype == io_dtype and io_dtype != self._flat_weights[0].dtype

    def _scripted_forward_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if (
            self._valid_for_kernel(input, hx)
            and not (torch.is_grad_enabled() and _any_requires_grad(input, hx, self._flat_weights))
            and not torch.is_autocast_cpu_enabled()
        ):
            return self._scripted_packed_forward(input, hx)
        return self._scripted_stock_tensor(input, hx)

    def _scripted_packed_forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # _run_kernel's computation through the PackedLayer modules, which TorchScript can serialize.
        batched = input.dim() == 3
        if batched:
            x = (input.transpose(0, 1) if self.batch_first else input).contiguous()
        else:
            x = input.unsqueeze(1).contiguous()
        count = len(self.packed_layers)
        if hx is None:
            zeros = torch.zeros(1, x.size(1), self.hidden_size, dtype=x.dtype)
            h0 = [zeros] * count
            c0 = h0
        else:
            h, c = hx
            if not batched:
                h = h.unsqueeze(1)
                c = c.unsqueeze(1)
            h0 = h.contiguous().split(1)
            c0 = c.contiguous().split(1)
        hs: List[Tensor] = []
        cs: List[Tensor] = []
        forward_out = x
        for i, layer in enumerate(self.packed_layers):
            y, hy, cy = layer(x, h0[i], c0[i])
            hs.append(hy)
            cs.append(cy)
            if not self.bidirectional:
                x = y
            elif i % 2 == 0:
                forward_out = y
            else:
                x = torch.cat([forward_out, y], 2)
        h_n = torch.cat(hs, 0)
        c_n = torch.cat(cs, 0)
        if not batched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (h_n, c_n)

    def _scripted_stock_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # The tensor branch of nn.LSTM.forward (proj_size is always 0 here).
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            num_directions = 2 if self.bidirectional else 1
            zeros = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        else:
            if is_batched:
                if hx[0].dim() != 3 or hx[1].dim() != 3:
                    raise RuntimeError(
                        f"For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            else:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        # nn.LSTM.check_input skips its dtype check when scripted; the op would fail obscurely without it.
        weight_dtype = self._flat_weights[0].dtype
        if input.dtype != weight_dtype and not torch.is_autocast_cpu_enabled():
            given = _dtype_str(input.dtype)
            wanted = _dtype_str(weight_dtype)
            raise ValueError(
                f"RNN input dtype ({given}) does not match weight dtype ({wanted}). "
                f"Convert input: input.to({wanted}), or convert model: model.to({given})")
        self.check_forward_args(input, hx, None)
        result = _VF.lstm(input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout,
                          self.training, self.bidirectional, self.batch_first)
        output = result[0]
        hidden = (result[1], result[2])
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _scripted_stock_packed(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        # The PackedSequence branch of nn.LSTM.forward.
        data = input.data
        batch_sizes = input.batch_sizes
        if hx is None:
            num_directions = 2 if self.bidirectional else 1
            zeros = torch.zeros(self.num_layers * num_directions, int(batch_sizes[0]), self.hidden_size,
                                dtype=data.dtype, device=data.device)
            hx = (zeros, zeros)
        else:
            hx = self.permute_hidden(hx, input.sorted_indices)
        result = _VF.lstm(data, batch_sizes, hx, self._flat_weights, self.bias, self.num_layers,
                          self.dropout, self.training, self.bidirectional)
        output = PackedSequence(result[0], batch_sizes, input.sorted_indices, input.unsorted_indices)
        return output, self.permute_hidden((result[1], result[2]), input.unsorted_indices)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.io_dtype is not None:
            s += f", io_dtype={self.io_dtype}"
        return s


def _dtype_of(input) -> Optional[torch.dtype]:
    if isinstance(input, Tensor):
        return input.dtype
    if isinstance(input, PackedSequence):
        return input.data.dtype
    return None


def _dtype_str(dtype: torch.dtype) -> str:
    # TorchScript formats a dtype as its enum number; spell the common ones out.
    names = [(torch.float32, "torch.float32"), (torch.float64, "torch.float64"), (torch.bfloat16, "torch.bfloat16"),
             (torch.float16, "torch.float16"), (torch.int64, "torch.int64"), (torch.int32, "torch.int32"),
             (torch.int8, "torch.int8"), (torch.uint8, "torch.uint8"), (torch.bool, "torch.bool")]
    for candidate, name in names:
        if dtype == candidate:
            return name
    return f"{dtype}"


def _cast_hidden(
    hx: Optional[Tuple[Tensor, Tensor]], dtype: torch.dtype
) -> Optional[Tuple[Tensor, Tensor]]:
    if hx is None:
        return None
    return (hx[0].to(dtype), hx[1].to(dtype))


def _any_requires_grad(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]) -> bool:
    if input.requires_grad:
        return True
    if hx is not None and (hx[0].requires_grad or hx[1].requires_grad):
        return True
    for w in weights:
        if w.requires_grad:
            return True
    return False
