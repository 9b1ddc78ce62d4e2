"""``PackedLSTM``: an ``nn.LSTM`` whose weights are laid out for oneDNN once instead of on every call.

Eager ``nn.LSTM`` on CPU already runs oneDNN's LSTM primitive, but it reorders every weight matrix into
the primitive's blocked layout on every call. ``PackedLSTM`` is an ``nn.LSTM`` (same parameter names and
shapes, ``state_dict`` and errors) with one ``PackedLayer`` per layer and direction holding those weights
packed by ``mkldnn._reorder_mkldnn_rnn_layer_weight``; it runs ``aten.mkldnn_rnn_layer`` on them: the
decomposition inductor uses (PR #103071), without compiling.

The packed copy is the only one kept in memory: the dense weight matrices are recovered from it, exactly,
whenever something needs them (``state_dict()``, pickling, ``.to()``, training, nn.LSTM's own path), so the
optimized model is no larger than the original. Reading ``lstm.weight_ih_l0`` brings the dense copy back
for good (``release_dense()`` drops it again); only code that reaches the Parameter objects without the
attribute (a parent's ``.parameters()``) sees the placeholder they hold meanwhile: the right shape and
dtype over a single NaN, so that a stray read is loud rather than plausible.

The op checks almost nothing (non-contiguous input is silently wrong, B=0 kills the process, ...), so a
call takes a fast kernel only when every argument is positively known to be valid for it; anything else
takes nn.LSTM's own path, which computes the stock result or raises the stock error.

Kernels (``PackedLSTM.kernel``): ``"onednn"`` (the packed op; bit-identical to nn.LSTM), ``"cell"`` (one
``aten.lstm_cell`` per layer for single-step calls; within 1e-6 of nn.LSTM, faster than the op's fixed
per-call cost at one step), ``"stock"`` (nn.LSTM as is). ``lstmopt.autotune`` picks one per module.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
import copy
import sys
import threading
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["KERNELS", "PACKABLE_DTYPES", "PackedLSTM", "PackedLayer", "bf16_supported", "packing_obstacle"]

# Looked up once: a one-step call spends ~25 us in the op, and each attribute lookup on torch._C adds up.
_tracing = torch._C._get_tracing_state
_autocast_enabled = torch._C._is_any_autocast_enabled
_mkldnn_enabled = torch._C._get_mkldnn_enabled
_grad_enabled = torch.is_grad_enabled

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
KERNELS = ("onednn", "cell", "stock")
EXACT_KERNELS = ("onednn", "stock")


def bf16_supported() -> bool:
    """Whether this CPU runs oneDNN bf16 natively (emulated bf16 is slower than fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _obstacle(weights: List[Tensor], dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why these LSTM weights (converted to ``dtype`` if given) cannot be packed, or None if they can."""
    devices = {w.device for w in weights}
    if devices != {torch.device("cpu")}:
        where = ", ".join(sorted(str(d) for d in devices))
        return f"weights are on {where}; oneDNN packing is CPU-only"
    dtypes = {dtype} if dtype is not None else {w.dtype for w in weights}
    if len(dtypes) != 1:
        return "weights have mixed dtypes " + ", ".join(sorted(_dtype_name(d) for d in dtypes))
    target = dtypes.pop()
    if target not in PACKABLE_DTYPES:
        return f"dtype {_dtype_name(target)} is not supported by the packed kernel (float32, bfloat16)"
    if target == torch.bfloat16 and not bf16_supported():
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
    if dtype is not None and dtype not in PACKABLE_DTYPES:
        return f"dtype {_dtype_name(dtype)} is not supported by the packed kernel (float32, bfloat16)"
    return _obstacle([lstm._parameters[name] for name in lstm._flat_weights_names], dtype)


def _placeholder(like: Tensor) -> Tensor:
    """What a released weight matrix holds: its shape and dtype over one NaN, so a stray read is loud."""
    return torch.full((1,), float("nan"), dtype=like.dtype).expand(like.shape)


class PackedLayer(nn.Module):
    """One layer in one direction: its weight matrices packed for oneDNN, and its biases.

    The packs are opaque oneDNN tensors whose layout depends on the CPU, so they are never serialized. In
    TorchScript, ``__getstate__`` returns the dense matrices recovered from them and ``__setstate__`` packs
    again on the loading machine (TorchScript assigns state field by field, hence the fixed names). Python
    pickling goes through the parent, which owns the dense parameters.
    """

    input_size: int
    hidden_size: int
    reverse: bool
    has_biases: bool

    def __init__(self, input_size: int, hidden_size: int, reverse: bool, has_biases: bool) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.reverse = reverse
        self.has_biases = has_biases
        self.release()

    @torch.jit.export
    def pack(self, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> None:
        packed = torch.ops.mkldnn._reorder_mkldnn_rnn_layer_weight(
            weight_ih, weight_hh, self.hidden_size, self.reverse, self.has_biases, False
        )
        self.packed_ih = packed[0]
        self.packed_hh = packed[1]
        # Unused when has_biases is False, but the op still needs tensors of the weights' dtype.
        self.bias_ih = bias_ih
        self.bias_hh = bias_hh

    @torch.jit.export
    def release(self) -> None:
        empty = torch.empty(0)
        self.packed_ih = empty
        self.packed_hh = empty
        self.bias_ih = empty
        self.bias_hh = empty

    @torch.jit.export
    def dense(self) -> Tuple[Tensor, Tensor]:
        """The weight matrices as nn.LSTM holds them, recovered exactly from the packs."""
        ih = self.packed_ih.to_dense() if self.packed_ih.is_mkldnn else self.packed_ih
        hh = self.packed_hh.to_dense() if self.packed_hh.is_mkldnn else self.packed_hh
        gates = 4 * self.hidden_size
        return (ih.reshape(self.input_size, gates).t().contiguous(),
                hh.reshape(self.hidden_size, gates).t().contiguous())

    def forward(self, input: Tensor, hx: Tensor, cx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One layer over a contiguous time-major (T, B, I) input with contiguous (1, B, H) states."""
        # mode 2 is ideep::rnn_kind::LSTM; the op runs one layer, one direction, time-major, inference.
        out = torch.mkldnn_rnn_layer(
            input, self.packed_ih, self.packed_hh, self.bias_ih, self.bias_hh, hx, cx,
            self.reverse, [], 2, self.hidden_size, 1, self.has_biases, False, False, False,
        )
        return out[0], out[1], out[2]

    @torch.jit.export
    def __getstate__(self):
        if torch.jit.is_scripting():
            if self.packed_ih.numel() > 0:
                weight_ih, weight_hh = self.dense()
            else:  # released: the parent's kernel works from its dense parameters
                weight_ih, weight_hh = self.packed_ih, self.packed_hh
            return (weight_ih, weight_hh, self.bias_ih, self.bias_hh, self.input_size, self.hidden_size,
                    self.reverse, self.has_biases, self.training)
        state = self.__dict__.copy()
        empty = torch.empty(0)
        for name in ("packed_ih", "packed_hh", "bias_ih", "bias_hh"):
            state[name] = empty
        return state

    @torch.jit.export
    def __setstate__(self, state: Tuple[Tensor, Tensor, Tensor, Tensor, int, int, bool, bool, bool]) -> None:
        if torch.jit.is_scripting():
            self.input_size = state[4]
            self.hidden_size = state[5]
            self.reverse = state[6]
            self.has_biases = state[7]
            self.training = state[8]
            self.release()
            if state[0].numel() > 0:
                self.pack(state[0], state[1], state[2], state[3])
            return
        self.__dict__.update(state)

    def extra_repr(self) -> str:
        direction = "reverse" if self.reverse else "forward"
        layout = "packed" if self.packed_ih.numel() > 0 else "released"
        return f"{self.input_size}, {self.hidden_size}, {direction}, {layout}"


class PackedLSTM(nn.LSTM):
    """Drop-in ``nn.LSTM`` for CPU inference on weights packed once for oneDNN (see the module docstring).

    Build one with ``PackedLSTM.from_lstm(lstm)`` (a copy), ``PackedLSTM(input_size, hidden_size, ...)``
    (like ``nn.LSTM``), or ``lstmopt.optimize(model)``. The fast kernel serves CPU tensors in the packed
    dtype in eval mode without autograd; every other call (training, grad, PackedSequence, autocast, other
    dtypes or devices, invalid input) computes exactly what nn.LSTM computes.

    ``io_dtype``: when set (``optimize(dtype=torch.bfloat16)`` sets it to float32), inputs arriving in
    ``io_dtype`` are cast to the weights' dtype and results cast back, so a bf16 LSTM can sit inside an
    fp32 model.
    """

    # Python-only bookkeeping: a scripted module cannot observe tensor versions, locks or Python tuples.
    __jit_ignored_attributes__ = ["_packed_from", "_pack_lock", "_zeros", "_kernel_args", "autotune_ms",
                                  "all_weights"]
    __jit_unused_properties__ = ["packed_layers", "weight_matrix_names", *nn.LSTM.__jit_unused_properties__]

    kernel: str
    dense_resident: bool
    packed_dtype: Optional[torch.dtype]
    kernel_dtype: Optional[torch.dtype]
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
        self.kernel = "onednn"
        self.dense_resident = True
        self.packed_dtype = None
        self.kernel_dtype = None
        self.autotune_ms: Optional[dict] = None
        self._pack_lock = threading.RLock()
        self._packed_from: List[Tuple[str, Tensor, int, int]] = []
        directions = 2 if self.bidirectional else 1
        self.packed_layers = nn.ModuleList(
            PackedLayer(self.input_size if layer == 0 else self.hidden_size * directions, self.hidden_size,
                        reverse=d == 1, has_biases=self.bias)
            for layer in range(self.num_layers) for d in range(directions)
        )
        self.repack()

    @property
    def packed_layers(self) -> nn.ModuleList:
        """One ``PackedLayer`` per layer and direction, in nn.LSTM order (l0, l0_reverse, l1, ...)."""
        # nn.Module.__getattr__ costs ~0.6 us per lookup, 2% of a one-step call; scripted code sees the
        # registered submodule directly.
        return self._modules["packed_layers"]

    @property
    def weight_matrix_names(self) -> List[str]:
        """The weight_ih/weight_hh parameter names: what is packed (biases stay dense)."""
        return [n for n in self._flat_weights_names if n.startswith("weight_")]

    # ---------------------------------------------------------------------------------------------
    # Keeping the packs and the dense parameters consistent

    def repack(self) -> None:
        """Pack the current dense weights again, then drop the dense copy unless it must stay.

        Runs after every change lstmopt can see (``load_state_dict``, ``.to()``, in-place edits,
        reassignment); call it yourself only after changing weights some other way.
        """
        with self._pack_lock:
            self.materialize_dense(keep=False)
            names = self._flat_weights_names
            weights = [self._parameters[name] for name in names]
            obstacle = _obstacle(weights) if self.kernel == "onednn" else "not the onednn kernel"
            if obstacle is None and [tuple(w.shape) for w in weights] != self._expected_shapes():
                obstacle = "weights were replaced by tensors of other shapes"  # the op would read out of bounds
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
            # The dtype inputs need for the fast kernel; None: every call takes nn.LSTM's path.
            self.kernel_dtype = self.packed_dtype
            if self.kernel == "cell" and _obstacle(weights, torch.float32) is None and weights[0].dtype == torch.float32:
                self.kernel_dtype = torch.float32
            self._zeros = torch.empty(0, 0)
            self._kernel_args = tuple(
                (layer.packed_ih, layer.packed_hh, layer.bias_ih, layer.bias_hh, layer.reverse)
                for layer in self.packed_layers
            )
            self._release_dense()

    def materialize_dense(self, keep: bool = True) -> None:
        """Put the real dense weight matrices back into the parameters (recovered exactly from the packs).

        ``keep=True`` (the public use) keeps them resident, at the cost of a second copy of the weights,
        until ``release_dense()``. Internally (``keep=False``: training, ``.to()``, ``load_state_dict``) they
        are dropped again at the next repack.
        """
        with self._pack_lock:
            if keep:
                self._keep_dense = True
            if self.dense_resident:
                return
            for layer, (ih, hh) in zip(self.packed_layers, self._matrix_name_pairs()):
                weight_ih, weight_hh = layer.dense()
                self._parameters[ih].data = weight_ih
                self._parameters[hh].data = weight_hh
            self.dense_resident = True
            self._snapshot()

    def release_dense(self) -> None:
        """Drop the dense weight matrices again after ``materialize_dense()`` (the packs take over)."""
        with self._pack_lock:
            self._keep_dense = False
            if self.dense_resident and self.kernel == "onednn":
                self.repack()

    def _release_dense(self) -> None:
        """Drop the dense weight matrices when the packs can stand in for them."""
        if (self.dense_resident and self.kernel == "onednn" and self.packed_dtype is not None
                and not self.training and not getattr(self, "_keep_dense", False)):
            for name in self.weight_matrix_names:
                param = self._parameters[name]
                param.data = _placeholder(param)
            self.dense_resident = False
        self._snapshot()

    def _expected_shapes(self) -> List[Tuple[int, ...]]:
        gates, shapes = 4 * self.hidden_size, []
        for layer in self.packed_layers:
            shapes += [(gates, layer.input_size), (gates, self.hidden_size)]
            shapes += [(gates,), (gates,)] if self.bias else []
        return shapes

    def _matrix_name_pairs(self) -> List[Tuple[str, str]]:
        names = self.weight_matrix_names
        return list(zip(names[0::2], names[1::2]))

    def _snapshot(self) -> None:
        self._packed_from = [(n, w, w._version, w.data_ptr())
                             for n, w in ((n, self._parameters[n]) for n in self._flat_weights_names)]

    def use_kernel(self, kernel: str) -> None:
        """Switch to ``kernel`` ("onednn", "cell" or "stock"); only "onednn" keeps packs, the others keep
        the dense weights (so each module holds one copy of its weights either way)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        with self._pack_lock:
            self.materialize_dense(keep=False)
            self.kernel = kernel
            self.repack()

    def train(self, mode: bool = True):
        if mode:
            self.materialize_dense(keep=False)  # an optimizer needs the real values
            return super().train(mode)
        result = super().train(mode)
        if self.dense_resident and self.kernel == "onednn":
            self.repack()  # training may have changed the weights; the packs take over again
        return result

    def _apply(self, fn, recurse=True):
        self.materialize_dense(keep=False)
        result = super()._apply(fn, recurse)
        self.repack()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        self.materialize_dense(keep=False)
        self._loading = True  # load_state_dict(assign=True) sets each parameter: pack once, at the end
        try:
            super()._load_from_state_dict(*args, **kwargs)
        finally:
            self._loading = False
        self.repack()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if keep_vars:  # the caller wants the Parameter objects themselves: they must hold real values
            self.materialize_dense(keep=False)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.dense_resident:
            for layer, (ih, hh) in zip(self.packed_layers, self._matrix_name_pairs()):
                destination[prefix + ih], destination[prefix + hh] = layer.dense()

    def __getattr__(self, name):
        # Reading a released weight matrix hands out the Parameter: give it its real values, for good.
        # torch.jit.script reads every attribute to copy it into the scripted module; the scripted
        # PackedLayers serialize the packs, so scripting must not bring the dense copy back.
        if (not self.__dict__.get("dense_resident", True) and name in self.weight_matrix_names
                and not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.jit.")):
            self.materialize_dense(keep=True)
        return super().__getattr__(name)

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        # Redefined here only so that torch.jit.script, which reads every property of the class it
        # compiles unless listed in __jit_ignored_attributes__, does not bring the dense copy back.
        return super().all_weights

    def _weights_have_changed(self):
        # nn.LSTM's version reads each weight through getattr, which would bring the dense copy back.
        params = self._parameters
        return any(ref is not None and ref() is not params.get(name)
                   for ref, name in zip(self._flat_weight_refs, self._flat_weights_names))

    def __setattr__(self, name, value):
        if (isinstance(value, nn.Parameter) and name in getattr(self, "_flat_weights_names", ())
                and "_pack_lock" in self.__dict__ and not self.__dict__.get("_loading")):
            self.materialize_dense(keep=False)  # every other weight must be real to repack
            super().__setattr__(name, value)
            self.repack()
            return
        super().__setattr__(name, value)

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_packed_from", "_pack_lock", "_zeros", "_kernel_args"):  # rebuilt on load
            state.pop(name, None)
        if not self.dense_resident:  # pickle the dense weights, recovered from the packs
            params = dict(state["_parameters"])
            for layer, (ih, hh) in zip(self.packed_layers, self._matrix_name_pairs()):
                weight_ih, weight_hh = layer.dense()
                params[ih] = nn.Parameter(weight_ih, requires_grad=params[ih].requires_grad)
                params[hh] = nn.Parameter(weight_hh, requires_grad=params[hh].requires_grad)
            state["_parameters"] = params
            state["dense_resident"] = True
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._pack_lock = threading.RLock()
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
            kernel = self._fast_kernel(input, hx)
            if kernel is None:
                return self._stock(input, hx)
            run = self._run_onednn if kernel == "onednn" else self._run_cells
            if _grad_enabled():  # nothing requires grad here: skip the training primitive
                with torch.no_grad():
                    return run(input, hx)
            return run(input, hx)

        # TorchScript cannot call super().forward, so the scripted dispatch spells out the stock paths.
        if isinstance(input, PackedSequence):
            data = input.data
            if self._casts_at_boundary(data.dtype):
                weight_dtype = self._flat_weights[0].dtype
                cast = PackedSequence(data.to(weight_dtype), input.batch_sizes,
                                      input.sorted_indices, input.unsorted_indices)
                out, hidden = self._stock_packed_sequence(cast, _cast_hidden(hx, weight_dtype), self._stock_weights())
                out = PackedSequence(out.data.to(data.dtype), out.batch_sizes,
                                     out.sorted_indices, out.unsorted_indices)
                return out, (hidden[0].to(data.dtype), hidden[1].to(data.dtype))
            return self._stock_packed_sequence(input, hx, self._stock_weights())
        else:
            if self._casts_at_boundary(input.dtype):
                weight_dtype = self._flat_weights[0].dtype
                output, hidden = self._scripted_forward_tensor(input.to(weight_dtype),
                                                               _cast_hidden(hx, weight_dtype))
                return output.to(input.dtype), (hidden[0].to(input.dtype), hidden[1].to(input.dtype))
            return self._scripted_forward_tensor(input, hx)

    def _fast_kernel(self, input, hx) -> Optional[str]:
        """The kernel that computes this call exactly as nn.LSTM would (within 1e-6 for "cell"), or None
        for nn.LSTM's own path. For "onednn" the packs are brought up to date with the weights first."""
        # A tracer must record the stock op, not opaque constants; autocast would try to cast the packs;
        # with mkldnn disabled, eager runs its native kernel.
        if _tracing() or _autocast_enabled() or not _mkldnn_enabled():
            return None
        if type(input) is not Tensor:  # PackedSequence, tensor subclasses
            return None
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                return None
            if type(hx[0]) is not Tensor or type(hx[1]) is not Tensor:
                return None
        if not self._valid_for_kernel(input, hx):
            return None
        if _grad_enabled() and _any_requires_grad(input, hx, self._flat_weights):
            return None
        kernel = self.kernel
        if kernel == "cell":
            return kernel
        # In-place edits bump the version counter and ``.data =`` moves the data: pack again. A swapped
        # Parameter object (torch.func.functional_call) is temporary: take nn.LSTM's path with it.
        params = self._parameters
        for name, weight, version, ptr in self._packed_from:
            current = params[name]
            if current is not weight:
                return None
            if current._version != version or current.data_ptr() != ptr:
                self.repack()
                return "onednn" if self._valid_for_kernel(input, hx) else None
        return kernel

    def _valid_for_kernel(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> bool:
        """Device, dtype, layout and every shape a fast kernel would trust without checking."""
        dtype = self.kernel_dtype
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
        if steps != 1 and self.kernel == "cell":
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

    def _run_onednn(self, input: Tensor, hx):
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

    def _run_cells(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """A single time step as one aten.lstm_cell per layer and direction: no primitive to set up, so
        at one step it beats the op's fixed cost; within 1e-6 of nn.LSTM, not bit-identical."""
        batched = input.dim() == 3
        x = input.reshape(-1, self.input_size)  # (B, I): the one time step
        batch = x.size(0)
        states = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            if torch.jit.is_scripting():
                zeros = torch.zeros(batch, self.hidden_size, dtype=x.dtype)
            else:  # lstm_cell only reads its states: one cached zero tensor serves every call
                zeros = self._zeros
                if zeros.size(0) != batch or zeros.dim() != 2:
                    zeros = self._zeros = torch.zeros(batch, self.hidden_size, dtype=x.dtype)
            h0 = [zeros] * states
            c0 = h0
        else:
            h0 = hx[0].reshape(states, batch, self.hidden_size).unbind(0)
            c0 = hx[1].reshape(states, batch, self.hidden_size).unbind(0)
        weights = self._flat_weights
        per_layer = len(weights) // states
        hs: List[Tensor] = []
        cs: List[Tensor] = []
        forward_h = x
        for i in range(states):
            w = weights[i * per_layer:(i + 1) * per_layer]
            b_ih: Optional[Tensor] = w[2] if self.bias else None
            b_hh: Optional[Tensor] = w[3] if self.bias else None
            h, c = torch.lstm_cell(x, [h0[i], c0[i]], w[0], w[1], b_ih, b_hh)
            hs.append(h)
            cs.append(c)
            if not self.bidirectional:
                x = h
            elif i % 2 == 0:
                forward_h = h
            else:
                x = torch.cat([forward_h, h], 1)
        # unsqueeze is a view; stack would copy (a measurable cost at this size)
        h_n = hs[0].unsqueeze(0) if states == 1 else torch.stack(hs, 0)
        c_n = cs[0].unsqueeze(0) if states == 1 else torch.stack(cs, 0)
        if not batched:
            return x, (h_n.squeeze(1), c_n.squeeze(1))
        return x.unsqueeze(1 if self.batch_first else 0), (h_n, c_n)

    def _stock(self, input, hx):
        """nn.LSTM's own path. With released dense weights and no autograd involved, it runs on dense
        copies recovered for this call, so the dense weights need not come back for good."""
        if self.dense_resident:
            return super().forward(input, hx)
        tensors = [t for t in (input, *(hx if isinstance(hx, (tuple, list)) else ())) if isinstance(t, Tensor)]
        if isinstance(input, PackedSequence):
            tensors.append(input.data)
        if self.training or (_grad_enabled() and (any(t.requires_grad for t in tensors)
                                                   or any(w.requires_grad for w in self._flat_weights))):
            self.materialize_dense(keep=False)  # autograd must see the parameters themselves
            return super().forward(input, hx)
        weights = self._stock_weights()
        if isinstance(input, PackedSequence):
            return self._stock_packed_sequence(input, hx, weights)
        if isinstance(hx, list):
            hx = tuple(hx)
        return self._stock_tensor(input, hx, weights)

    def _stock_weights(self) -> List[Tensor]:
        """The weights nn.LSTM would use now, with released matrices recovered from the packs."""
        if self.dense_resident:
            return self._flat_weights
        weights: List[Tensor] = []
        for layer in self.packed_layers:
            weight_ih, weight_hh = layer.dense()
            weights.append(weight_ih)
            weights.append(weight_hh)
            if self.bias:
                weights.append(layer.bias_ih)
                weights.append(layer.bias_hh)
        if not torch.jit.is_scripting():  # torch.func.functional_call may have swapped some parameters
            for i, name in enumerate(self._flat_weights_names):
                current = self._parameters[name]
                if current is not self._packed_from[i][1]:
                    weights[i] = current
        return weights

    def _stock_tensor(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # The tensor branch of nn.LSTM.forward (proj_size is always 0 here), on the given weights.
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
        result = _VF.lstm(input, hx, weights, self.bias, self.num_layers, self.dropout,
                          self.training, self.bidirectional, self.batch_first)
        output = result[0]
        hidden = (result[1], result[2])
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _stock_packed_sequence(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        # The PackedSequence branch of nn.LSTM.forward, on the given weights.
        data = input.data
        batch_sizes = input.batch_sizes
        if hx is None:
            num_directions = 2 if self.bidirectional else 1
            zeros = torch.zeros(self.num_layers * num_directions, int(batch_sizes[0]), self.hidden_size,
                                dtype=data.dtype, device=data.device)
            hx = (zeros, zeros)
        else:
            hx = self.permute_hidden(hx, input.sorted_indices)
        result = _VF.lstm(data, batch_sizes, hx, weights, self.bias, self.num_layers,
                          self.dropout, self.training, self.bidirectional)
        output = PackedSequence(result[0], batch_sizes, input.sorted_indices, input.unsorted_indices)
        return output, self.permute_hidden((result[1], result[2]), input.unsorted_indices)

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
            if self.kernel == "onednn":
                return self._scripted_onednn(input, hx)
            return self._run_cells(input, hx)
        return self._stock_tensor(input, hx, self._stock_weights())

    def _scripted_onednn(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # _run_onednn's computation through the PackedLayer modules, which TorchScript can serialize.
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

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", kernel={self.kernel}"
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
