"""``PackedLSTM``: an ``nn.LSTM`` whose weights are laid out for oneDNN once instead of on every call.

Eager ``nn.LSTM`` on CPU already runs oneDNN's LSTM primitive, but it reorders every weight matrix into
the primitive's blocked layout on every call. ``PackedLSTM`` is an ``nn.LSTM`` (same parameters, names,
``state_dict`` and errors) that also holds one ``PackedLayer`` per layer and direction with those weights
packed once, and runs ``aten.mkldnn_rnn_layer`` on them: the decomposition inductor uses (PR #103071),
without compiling.

The parameters always hold the real dense weights, so every route to them (``parameters()``,
``state_dict()``, optimizers, weight averaging, nn.LSTM's own path) sees true values; the packs are an
extra copy of the weight matrices, kept up to date: ``load_state_dict``, ``.to()`` and reassigning a
parameter repack at once, and an in-place edit (``copy_``, an optimizer step, ``.data =``) is noticed by
the next call, which packs again first.

Kernels for tensors (``PackedLSTM.kernel``): ``"onednn"`` (the packed op; bit-identical to nn.LSTM),
``"cell"`` (one ``aten.lstm_cell`` per layer for single-step calls; within 1e-6 of nn.LSTM, faster than
the op's fixed per-call cost at one step), ``"native"`` (lstmopt's own kernel, ``lstmopt.native``: the
whole call in one native call, fastest at one step and short chunks; within 1e-6, built on first use),
``"stock"`` (nn.LSTM as is). For PackedSequences (``PackedLSTM.sequence_kernel``): ``"stock"`` (nn.LSTM's
own path, as eager runs them), ``"onednn"`` (the packed op on padded runs of the batch; within 1e-6 of
nn.LSTM) or ``"native"``. ``lstmopt.rewrite.autotune`` picks per module.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
import threading
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import native
from lstmopt.kernels import table as kernel_table
from lstmopt.modules.guards import valid_for_kernel, valid_sequence
from lstmopt.kernels.aten import LayerArgs, run_cells, run_onednn, run_onednn_sequence
from lstmopt.kernels.native import NativePacks
from lstmopt.kernels.tensor_versions import version_of
from lstmopt.modules.packs import PackedLayer, packing_obstacle, tracked_copy, weights_obstacle
from lstmopt.modules.scripted import ScriptedPaths

__all__ = ["EXACT_KERNELS", "EXACT_SEQUENCE_KERNELS", "KERNELS", "PackedLSTM", "SEQUENCE_KERNELS"]

# Looked up once: a one-step call spends ~25 us in the op, and each attribute lookup on torch._C adds up.
_tracing = torch._C._get_tracing_state
_autocast_enabled = torch._C._is_any_autocast_enabled
_mkldnn_enabled = torch._C._get_mkldnn_enabled
_grad_enabled = torch.is_grad_enabled
_dynamo_callback = torch._C._dynamo.eval_frame.get_eval_frame_callback
_dispatch_modes = torch._C._len_torch_dispatch_stack

# Names from the kernel table (lstmopt.kernels.table), which says what each serves and needs.
KERNELS = kernel_table.names(kernel_table.TENSOR)
SEQUENCE_KERNELS = kernel_table.names(kernel_table.SEQUENCE)
EXACT_KERNELS = kernel_table.names(kernel_table.TENSOR, exact_only=True)
EXACT_SEQUENCE_KERNELS = kernel_table.names(kernel_table.SEQUENCE, exact_only=True)


class PackedLSTM(ScriptedPaths, nn.LSTM):
    """Drop-in ``nn.LSTM`` for CPU inference on weights packed once for oneDNN (see the module docstring).

    Build one with ``PackedLSTM.from_lstm(lstm)`` (a copy), ``PackedLSTM(input_size, hidden_size, ...)``
    (like ``nn.LSTM``), or ``lstmopt.optimize(model)``. The fast kernel serves CPU tensors in the packed
    dtype in eval mode with autograd off (``torch.no_grad()``, ``torch.inference_mode()``); every other call
    (autograd on, training, PackedSequence, autocast, other dtypes or devices, invalid input) takes
    nn.LSTM's own path on the same parameters.

    ``io_dtype``: when set (``optimize(dtype=torch.bfloat16)`` sets it to float32), inputs arriving in
    ``io_dtype`` are cast to the weights' dtype and results cast back, so a bf16 LSTM can sit inside an
    fp32 model.
    """

    # Python-only bookkeeping: a scripted module cannot hold locks, Python tuples or object identities.
    __jit_ignored_attributes__ = ["_packed_from", "_pack_lock", "_zeros", "_kernel_args", "_native", "autotune_ms",
                                  "sequence_autotune_ms", "_eager_in_compiled_code", "_is_packed_lstm", "_loads", "_loading_thread"]
    __jit_unused_properties__ = ["packed_layers", "uses_native_kernel", *nn.LSTM.__jit_unused_properties__]

    _is_packed_lstm = True  # packing_obstacle: this very class, not a subclass

    kernel: str
    sequence_kernel: str
    packed_dtype: Optional[torch.dtype]
    kernel_dtype: Optional[torch.dtype]
    sequence_dtype: Optional[torch.dtype]
    io_dtype: Optional[torch.dtype]
    # Present only while a native kernel is in use: scripted code tests hasattr(self, "native_packs"), so
    # a module that does not use it compiles (and loads) without the native library.
    native_packs: NativePacks

    def __init__(self, *args, io_dtype: Optional[torch.dtype] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        obstacle = packing_obstacle(self)
        if obstacle is not None:
            raise ValueError(f"cannot pack this LSTM: {obstacle}")
        self._init_packing(io_dtype)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, dtype: Optional[torch.dtype] = None) -> "PackedLSTM":
        """A ``PackedLSTM`` with a copy of ``lstm``'s weights (converted to ``dtype`` if given)."""
        return cls.convert_(tracked_copy(lstm), dtype)

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
        self.kernel = kernel_table.default(kernel_table.TENSOR)
        self.sequence_kernel = kernel_table.default(kernel_table.SEQUENCE)
        self.packed_dtype = None
        self.kernel_dtype = None
        self.sequence_dtype = None
        self._native = None
        self.autotune_ms: Optional[dict] = None  # what autotune measured per kernel, for tensor calls
        self.sequence_autotune_ms: Optional[dict] = None  # and for PackedSequence calls
        self._pack_lock = threading.RLock()
        self._loads = 0  # odd while load_state_dict writes the weights (see _dispatch)
        self._loading_thread = None
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
    def uses_native_kernel(self) -> bool:
        """Whether a kernel in use is the native one: a TorchScript archive of this module then needs the
        native library registered before ``torch.jit.load`` (``lstmopt.native.LOAD_LINE``)."""
        return "native_packs" in self.__dict__

    # ---------------------------------------------------------------------------------------------
    # Keeping the packs in step with the parameters

    @torch.jit.export
    def repack(self) -> None:
        """Pack the current weights again (when the kernel reads packs), or drop the packs.

        Runs after every change lstmopt is told of (``load_state_dict``, ``.to()``, reassignment) and
        before the first call after an in-place edit; call it yourself only to pay that cost up front.
        In a loaded TorchScript archive, which cannot repack during a call (concurrent calls would race),
        a scripted LSTM whose weights changed computes on nn.LSTM's path until ``repack()`` is called.
        """
        if not torch.jit.is_scripting():
            self._repack()
            return
        weights = self._weights_by_name()
        per_layer = len(weights) // len(self.packed_layers)
        for i, layer in enumerate(self.packed_layers):
            if layer.packs is not None:
                layer.pack(weights[i * per_layer].detach(), weights[i * per_layer + 1].detach(),
                           self._scripted_bias(weights, i * per_layer + 2), self._scripted_bias(weights, i * per_layer + 3))
        if hasattr(self, "native_packs"):
            self.native_packs = NativePacks([w.detach() for w in weights], self.hidden_size, self.num_layers,
                                            self.bidirectional, self.bias)

    def _repack(self, force: bool = True) -> None:
        """Bring the packs up to date with the parameters (``force``: pack again even where they look
        current, as after an edit of an inference tensor, which has no version to show it)."""
        with self._pack_lock:
            names = self._flat_weights_names
            weights = [self._parameters[name] for name in names]
            if "native" in (self.kernel, self.sequence_kernel) and not native.load():
                # Built for another machine and no compiler here: load() said so in one line.
                self.kernel = "onednn" if self.kernel == "native" else self.kernel
                self.sequence_kernel = "onednn" if self.sequence_kernel == "native" else self.sequence_kernel
            shapes_ok = [tuple(w.shape) for w in weights] == self._expected_shapes()  # else out-of-bounds reads
            reads_packs = (kernel_table.find(self.kernel, kernel_table.TENSOR).reads_packs
                           or kernel_table.find(self.sequence_kernel, kernel_table.SEQUENCE).reads_packs)
            obstacle = weights_obstacle(weights) if reads_packs else "no kernel in use reads packs"
            if obstacle is None and not shapes_ok:
                obstacle = "weights were replaced by tensors of other shapes"
            per_layer = len(names) // len(self.packed_layers)
            layers = []
            with torch.no_grad():
                for i, layer in enumerate(self.packed_layers):
                    w = [t.detach() for t in weights[i * per_layer:(i + 1) * per_layer]]
                    if obstacle is not None:
                        layer.clear()
                        continue
                    if not self.bias:  # the op ignores them then, but wants tensors of the weights' dtype
                        w += [torch.empty(0, dtype=w[0].dtype)] * 2
                    if force or not layer.is_current(w):
                        layer.pack(w[0], w[1], w[2], w[3])
                    packs = layer.packs
                    layers.append((packs.packed_ih, packs.packed_hh, packs.bias_ih, packs.bias_hh, layer.reverse))
            fp32 = weights_obstacle(weights, torch.float32) is None and weights[0].dtype == torch.float32
            self._pack_native(weights if fp32 and shapes_ok else None)
            self.packed_dtype = None if obstacle is not None else weights[0].dtype
            # The dtype inputs need for the fast kernels; None: such calls take nn.LSTM's path.
            self.kernel_dtype = {"onednn": self.packed_dtype, "cell": torch.float32 if fp32 and shapes_ok else None,
                                 "native": torch.float32 if self._native is not None else None}.get(self.kernel)
            self.sequence_dtype = {"onednn": self.packed_dtype,
                                   "native": torch.float32 if self._native is not None else None
                                   }.get(self.sequence_kernel)
            self._zeros = torch.empty(0, 0)
            # One tuple, swapped whole: a concurrent call sees the old packs or the new ones, never a mix.
            self._kernel_args: Tuple[LayerArgs, ...] = tuple(layers)
            self._packed_from = [(name, w, version_of(w), w.data_ptr()) for name, w in zip(names, weights)]

    def _pack_native(self, weights: Optional[List[Tensor]]) -> None:
        """The native kernel's packs, while a native kernel is in use and ``weights`` (fp32) can be packed."""
        if weights is None or "native" not in (self.kernel, self.sequence_kernel):
            self.__dict__.pop("native_packs", None)
            self._native = None
            return
        packs = NativePacks([w.detach() for w in weights], self.hidden_size, self.num_layers, self.bidirectional,
                            self.bias)
        self.native_packs = packs
        names = list(self._flat_weights_names)
        self._native = native.module().Packs(packs.weights, packs.biases, self.hidden_size, self.bidirectional, names,
                                             [self._parameters[name] for name in names])

    def _packs_are_current(self) -> Optional[bool]:
        """True if the packs hold the weights' current values, False if an in-place edit or ``.data =``
        made them stale, None if a parameter was swapped for another object (``torch.func.functional_call``):
        that call must take nn.LSTM's path with it. Checked on every call, so kept to a few hundred ns."""
        params = self._parameters
        for name, weight, version, address in self._packed_from:
            current = params[name]
            if current is not weight:
                return None
            if (version >= 0 and current._version != version) or current.data_ptr() != address:
                return False
        return True

    def _packable(self) -> bool:
        """Whether the weights, as they are, can be packed for oneDNN."""
        return weights_obstacle([self._parameters[name] for name in self._flat_weights_names]) is None

    def _expected_shapes(self) -> List[Tuple[int, ...]]:
        gates, shapes = 4 * self.hidden_size, []
        for layer in self.packed_layers:
            shapes += [(gates, layer.input_size), (gates, self.hidden_size)]
            shapes += [(gates,), (gates,)] if self.bias else []
        return shapes

    @torch.jit.export
    def flatten_parameters(self) -> None:
        """nn.LSTM's, a no-op on CPU (it compacts cuDNN's weight buffer). Exported, so that a scripted or
        traced PackedLSTM takes the call many wrappers make in their forward."""
        if not torch.jit.is_scripting():
            nn.LSTM.flatten_parameters(self)

    def use_kernel(self, kernel: Optional[str] = None, *, sequence_kernel: Optional[str] = None) -> None:
        """Switch the kernel for tensors (``KERNELS``) and/or for PackedSequences (``SEQUENCE_KERNELS``); the
        packs are kept only while a kernel in use reads them."""
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if sequence_kernel is not None and sequence_kernel not in SEQUENCE_KERNELS:
            raise ValueError(f"sequence_kernel must be one of {', '.join(SEQUENCE_KERNELS)}, got {sequence_kernel!r}")
        with self._pack_lock:
            self.kernel = kernel or self.kernel
            self.sequence_kernel = sequence_kernel or self.sequence_kernel
            self.repack()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.repack()  # .to() and friends may change the dtype, the device or the tensors themselves
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        # Held throughout, so a concurrent call that notices the copy in progress waits for the new packs;
        # a call computing on the parameters themselves meanwhile is redone (see _dispatch).
        with self._pack_lock:
            self._loads += 1
            self._loading_thread = threading.get_ident()
            try:
                self._loading = True  # load_state_dict(assign=True) sets each parameter: pack once, at the end
                try:
                    super()._load_from_state_dict(*args, **kwargs)
                finally:
                    self._loading = False
                self.repack()
            finally:
                self._loading_thread = None
                self._loads += 1

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if (isinstance(value, nn.Parameter) and name in getattr(self, "_flat_weights_names", ())
                and "_pack_lock" in self.__dict__ and not self.__dict__.get("_loading")):
            self.repack()

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_packed_from", "_pack_lock", "_zeros", "_kernel_args", "_native", "native_packs"):
            state.pop(name, None)  # rebuilt on load
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._pack_lock = threading.RLock()
        self._loads, self._loading_thread = 0, None
        self._native = None
        self._repack(force=False)  # the unpickled LayerPacks have packed already, from the same storage

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
            if torch.compiler.is_exporting():
                return self._with_io_casts(self._exported, input, hx)
            # Inside a torch.compile'd model: traced (torch._dynamo.config.allow_rnn) or run by its fallback
            if torch.compiler.is_compiling() or _dynamo_callback() is not None:
                return self._eager_in_compiled_code(input, hx)
            return self._eager(input, hx)

        # TorchScript cannot call super().forward, so the scripted dispatch spells out the stock paths.
        if isinstance(input, PackedSequence):
            return self._scripted_sequence(input, hx)
        else:
            return self._scripted_tensor(input, hx)

    def _with_io_casts(self, run, input, hx):
        """``run(input, hx)``, with inputs in ``io_dtype`` cast to the weights' dtype and results cast back."""
        weight_dtype = self._flat_weights[0].dtype
        if self.io_dtype is None or not self._casts_at_boundary(_dtype_of(input), weight_dtype):
            return run(input, hx)
        if hx is not None:
            hx = (hx[0].to(weight_dtype), hx[1].to(weight_dtype))
        output, (h, c) = run(input.to(weight_dtype), hx)
        return output.to(self.io_dtype), (h.to(self.io_dtype), c.to(self.io_dtype))

    def _eager(self, input, hx):
        if self.io_dtype is not None:
            return self._with_io_casts(self._dispatch, input, hx)
        return self._dispatch(input, hx)

    def _dispatch(self, input, hx):
        # The stock and cell paths compute on the parameters themselves, which load_state_dict overwrites
        # in place one by one: a call that overlapped a load (the count moved, or is odd: a load is
        # writing) is redone after it, so every call sees the old weights or the new ones, whole (a
        # seqlock; calls served from packs are whole anyway, and pay two attribute reads).
        while True:
            loads = self._loads
            if loads & 1 and self._loading_thread != threading.get_ident():
                with self._pack_lock:  # wait for the load to finish
                    continue
            result = self._dispatch_once(input, hx)
            if self._loads == loads or self._loading_thread == threading.get_ident():
                return result

    def _dispatch_once(self, input, hx):
        # A tracer must record the stock op, not opaque constants; autocast would try to cast the packs;
        # with mkldnn disabled, eager runs its native kernel. With autograd on, eager runs oneDNN's training
        # primitive, whose last bits differ from the inference primitive's on some CPUs (AVX2): only
        # nn.LSTM's own path gives its exact results then. Under a dispatch mode (FakeTensorMode, a
        # functionalization or profiling mode) tensors may hold no data for the kernels to read.
        if (_tracing() or _autocast_enabled() or not _mkldnn_enabled() or _grad_enabled() or self.training
                or _dispatch_modes() or not _plain_state(hx)):
            return super().forward(input, hx)
        kind = type(input)
        if kind is Tensor:
            kernel = self.kernel
            if kernel == "native":
                result = self._run_native(input, hx)
                if result is not None:
                    return result
            elif kernel == "onednn" and self._valid(input, hx) and self._packs_ready(lambda: self._valid(input, hx)):
                return run_onednn(input, hx, self._kernel_args, self.hidden_size, self.bidirectional,
                                  self.batch_first, self.bias, self._zero_state(input, 3))
            if kernel == "cell" and self._valid(input, hx):
                return run_cells(input, hx, self._flat_weights, self.input_size, self.hidden_size,
                                 self.num_layers, self.bidirectional, self.batch_first, self.bias,
                                 self._zero_state(input, 2))
        elif (kind is PackedSequence and self.sequence_dtype is not None and self._valid_sequence(input, hx)
              and self._packs_ready(lambda: self._valid_sequence(input, hx))):
            return self._run_sequence(input, hx)
        return super().forward(input, hx)

    def _run_native(self, input: Tensor, hx):
        """The native kernel's result, or None where nn.LSTM's path must serve the call. The kernel's own
        checks (input, states, weights unchanged since packing) take nanoseconds; only when they refuse does
        Python look closer: packs made stale by an edit are remade, and the call tried again."""
        native = self._native
        if native is None:
            return None
        result = native.try_forward(input, hx, self.batch_first, self._parameters)
        if result is None and self._valid(input, hx) and self._packs_ready(lambda: self._valid(input, hx)):
            native = self._native  # packs just made: they serve this call even if the weights change again
            if native is not None:
                h, c = (None, None) if hx is None else hx
                output, h_n, c_n = native.forward(input, None, h, c, self.batch_first)
                return output, (h_n, c_n)
        return result

    def _run_sequence(self, input: PackedSequence, hx):
        data, batch_sizes, sorted_indices, _ = input
        if hx is not None:
            hx = self.permute_hidden(hx, sorted_indices)  # as nn.LSTM: the caller's order -> longest first
        if self.sequence_kernel == "native":
            h, c = (None, None) if hx is None else hx
            output, h_n, c_n = self._native.forward(data, batch_sizes, h, c, False)
        else:
            output, h_n, c_n = run_onednn_sequence(data, batch_sizes, hx, list(self._kernel_args), self.hidden_size,
                                                   self.bidirectional, self.bias)
        return self._sequence_result(input, output, h_n, c_n)

    def _sequence_result(self, input: PackedSequence, output: Tensor, h_n: Tensor, c_n: Tensor
                         ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        """A sequence kernel's result as nn.LSTM gives it: output rows packed as the input's, states in the
        caller's order."""
        return (PackedSequence(output, input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                self.permute_hidden((h_n, c_n), input.unsorted_indices))

    # Dynamo does not trace nn.LSTM modules (it falls back to eager for the frame that calls one), but it
    # would try to compile every function this one calls, packs included: keep it out, so the packed path
    # runs at its eager speed and new sequence lengths compile nothing.
    _eager_in_compiled_code = torch.compiler.disable(_eager, recursive=True)

    def _exported(self, input, hx):
        """What torch.export records: one aten.mkldnn_rnn_layer per layer and direction on the dense
        parameters (the op lays them out itself, as eager does), which does not depend on the sequence
        length. An exported program holds no packs: it computes at eager speed, bit-identical to eager."""
        # Export traces with fake tensors (tensor subclasses) and with mkldnn switched off; the op itself
        # runs whatever that flag says, so only what the op accepts is checked here.
        weights = self._flat_weights
        if (not isinstance(input, Tensor) or isinstance(input, PackedSequence) or self.training
                or _autocast_enabled() or weights_obstacle(weights, weights[0].dtype) is not None
                or not (hx is None or (isinstance(hx, (tuple, list)) and len(hx) == 2
                                       and all(isinstance(h, Tensor) for h in hx)))
                or not valid_for_kernel(input, hx, weights[0].dtype, self.input_size, self.hidden_size,
                                        self.num_layers * (2 if self.bidirectional else 1), self.batch_first,
                                        False)):
            return super().forward(input, hx)
        per_layer = len(weights) // len(self.packed_layers)
        layers: List[LayerArgs] = []
        for i, layer in enumerate(self.packed_layers):
            w = weights[i * per_layer:(i + 1) * per_layer]
            empty = w[0].new_empty(0)
            layers.append((w[0], w[1], w[2] if self.bias else empty, w[3] if self.bias else empty, layer.reverse))
        return run_onednn(input, hx, layers, self.hidden_size, self.bidirectional, self.batch_first, self.bias)

    def _packs_ready(self, still_valid) -> bool:
        """Whether the packs can serve this call: they are brought up to date after an in-place edit (then
        ``still_valid()`` tells whether the call is still one the kernel takes); a parameter swapped for
        another object (``torch.func.functional_call``) is temporary: nn.LSTM's path serves that call."""
        current = self._packs_are_current()
        if current is None:
            return False
        if not current:
            with self._pack_lock:
                if not self._packs_are_current():  # another thread may have repacked meanwhile
                    self.repack()
            return still_valid()
        return True

    def _valid(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> bool:
        return valid_for_kernel(input, hx, self.kernel_dtype, self.input_size, self.hidden_size,
                                self.num_layers * (2 if self.bidirectional else 1), self.batch_first,
                                self.kernel == "cell")

    def _valid_sequence(self, input: PackedSequence, hx) -> bool:
        return type(input.data) is Tensor and valid_sequence(
            input.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices, hx, self.sequence_dtype,
            self.input_size, self.hidden_size, self.num_layers * (2 if self.bidirectional else 1))

    def _zero_state(self, input: Tensor, dims: int) -> Optional[Tensor]:
        """A cached zero state for ``run_onednn`` (dims=3) or ``run_cells`` (dims=2): the kernels only read
        their states, so one tensor serves every call of the same batch size and dtype."""
        batch = input.size(0 if self.batch_first else 1) if input.dim() == 3 else 1
        zeros = self._zeros
        if zeros.dim() != dims or zeros.size(-2) != batch or zeros.dtype != input.dtype:
            shape = (1, batch, self.hidden_size) if dims == 3 else (batch, self.hidden_size)
            zeros = self._zeros = torch.zeros(shape, dtype=input.dtype)
        return zeros

    # ---------------------------------------------------------------------------------------------
    # TorchScript only

    def _casts_at_boundary(self, dtype: Optional[torch.dtype], weight_dtype: torch.dtype) -> bool:
        io_dtype = self.io_dtype
        if io_dtype is None or dtype is None:
            return False
        return dtype == io_dtype and io_dtype != weight_dtype

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", kernel={self.kernel}"
        if self.sequence_kernel != "stock":
            s += f", sequence_kernel={self.sequence_kernel}"
        if self.io_dtype is not None:
            s += f", io_dtype={self.io_dtype}"
        return s


def _plain_state(hx) -> bool:
    """None, or a pair of plain tensors (what the kernels take; anything else is nn.LSTM's to judge)."""
    if hx is None:
        return True
    return isinstance(hx, (tuple, list)) and len(hx) == 2 and type(hx[0]) is Tensor and type(hx[1]) is Tensor


def _dtype_of(input) -> Optional[torch.dtype]:
    if isinstance(input, Tensor):
        return input.dtype
    if isinstance(input, PackedSequence):
        return input.data.dtype
    return None
