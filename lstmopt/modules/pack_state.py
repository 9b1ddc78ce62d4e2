"""``PackState``: the Python-only half of a ``PackedLSTM``'s packs, and how they are kept in step.

A ``PackedLSTM`` holds two kinds of pack state. What a scripted module reads (the ``PackedLayer`` packs,
``native_packs``, the kernel names and dtypes) lives on the module, where TorchScript sees it. What only
the eager dispatch reads lives here, in one object TorchScript never sees: the lock, the load counter
(a seqlock, see ``modules/dispatch.py``), the tuple of per-layer op arguments, the native library's
handle on its packs, and which tensors were packed at which version. Pickling drops it; the module
rebuilds it from its parameters on load.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor, nn

from lstmopt.kernels import native
from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.aten import LayerArgs
from lstmopt.kernels.native import NativePacks
from lstmopt.kernels.tensor_versions import version_of
from lstmopt.modules.packs import weights_obstacle

__all__ = ["PackedModule", "OneKernel", "PackState"]


class PackState:
    """What the eager dispatch of one ``PackedLSTM`` reads on every call, rebuilt by ``refresh``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.loads = 0  # odd while load_state_dict writes the weights
        self.loading_thread: Optional[int] = None
        self.loading = False  # load_state_dict(assign=True) sets each parameter: pack once, at the end
        # One tuple, swapped whole: a concurrent call sees the old packs or the new ones, never a mix.
        self.kernel_args: tuple[LayerArgs, ...] = ()
        self.native = None  # the native library's Packs object, while the native kernel can serve calls
        self.packed_from: list = []  # (name, tensor, version, data pointer) per parameter when packed
        self.zeros = torch.empty(0, 0)

    def refresh(self, module: nn.LSTM, force: bool = True) -> None:
        """Bring ``module``'s packs up to date with its parameters, or drop those no kernel in use reads
        (``force``: pack again even where they look current, as after an edit of an inference tensor,
        which has no version to show it). Sets the dtypes the fast kernels need (None: that kernel is off)."""
        with self.lock:
            names = module._flat_weights_names
            weights = [module._parameters[name] for name in names]
            if "native" in (module.kernel, module.sequence_kernel) and not native.load():
                # Built for another machine and no compiler here: load() said so in one line. An LSTMP
                # has no other kernel than nn.LSTM's own.
                instead = "stock" if module.proj_size > 0 else "onednn"
                module.kernel = instead if module.kernel == "native" else module.kernel
                module.sequence_kernel = instead if module.sequence_kernel == "native" else module.sequence_kernel
            shapes_ok = [tuple(w.shape) for w in weights] == _expected_shapes(module)  # else out-of-bounds reads
            reads_packs = (kernel_table.find(module.kernel, kernel_table.TENSOR).reads_packs
                           or kernel_table.find(module.sequence_kernel, kernel_table.SEQUENCE).reads_packs)
            obstacle = weights_obstacle(weights) if reads_packs else "no kernel in use reads packs"
            if obstacle is None and not shapes_ok:
                obstacle = "weights were replaced by tensors of other shapes"
            layers = self._pack_layers(module, weights, obstacle is None, force)
            fp32 = weights_obstacle(weights, torch.float32) is None and weights[0].dtype == torch.float32
            self._pack_native(module, weights if fp32 and shapes_ok else None)
            module.packed_dtype = None if obstacle is not None else weights[0].dtype
            native_dtype = torch.float32 if self.native is not None else None
            module.kernel_dtype = {"onednn": module.packed_dtype, "cell": torch.float32 if fp32 and shapes_ok else None,
                                   "native": native_dtype}.get(module.kernel)
            module.sequence_dtype = {"onednn": module.packed_dtype, "native": native_dtype}.get(module.sequence_kernel)
            self.zeros = torch.empty(0, 0)
            self.kernel_args = tuple(layers)
            self.packed_from = [(name, w, version_of(w), w.data_ptr()) for name, w in zip(names, weights)]

    @staticmethod
    def _pack_layers(module: nn.LSTM, weights: list[Tensor], pack: bool, force: bool) -> list[LayerArgs]:
        per_layer = len(weights) // len(module.packed_layers)
        layers = []
        with torch.no_grad():
            for i, layer in enumerate(module.packed_layers):
                if not pack:
                    layer.clear()
                    continue
                w = [t.detach() for t in weights[i * per_layer:(i + 1) * per_layer]]
                if not module.bias:  # the op ignores them then, but wants tensors of the weights' dtype
                    w += [torch.empty(0, dtype=w[0].dtype)] * 2
                if force or not layer.is_current(w):
                    layer.pack(w[0], w[1], w[2], w[3])
                packs = layer.packs
                layers.append((packs.packed_ih, packs.packed_hh, packs.bias_ih, packs.bias_hh, layer.reverse))
        return layers

    def _pack_native(self, module: nn.LSTM, weights: Optional[list[Tensor]]) -> None:
        """The native kernel's packs, while a native kernel is in use and ``weights`` (fp32) can be packed."""
        if weights is None or "native" not in (module.kernel, module.sequence_kernel):
            module.__dict__.pop("native_packs", None)
            self.native = None
            return
        packs = NativePacks([w.detach() for w in weights], module.hidden_size, module.num_layers,
                            module.bidirectional, module.bias, module.proj_size, "lstm", module.native_weights)
        module.native_packs = packs
        names = list(module._flat_weights_names)
        self.native = native.module().Packs(packs.weights, packs.biases, packs.projections, module.hidden_size,
                                            module.proj_size, module.bidirectional, "lstm", names,
                                            [module._parameters[name] for name in names])

    def is_current(self, parameters: dict) -> Optional[bool]:
        """True if the packs hold the weights' current values, False if an in-place edit or ``.data =``
        made them stale, None if a parameter was swapped for another object (``torch.func.functional_call``):
        that call must take nn.LSTM's path with it. Checked on every call, so kept to a few hundred ns."""
        for name, weight, version, address in self.packed_from:
            current = parameters[name]
            if current is not weight:
                return None
            if (version >= 0 and current._version != version) or current.data_ptr() != address:
                return False
        return True

    def ready(self, module: nn.LSTM, still_valid) -> bool:
        """Whether the packs can serve this call: they are brought up to date after an in-place edit (then
        ``still_valid()`` tells whether the call is still one the kernel takes); a parameter swapped for
        another object is temporary: nn.LSTM's path serves that call."""
        current = self.is_current(module._parameters)
        if current is None:
            return False
        if not current:
            with self.lock:
                if not self.is_current(module._parameters):  # another thread may have repacked meanwhile
                    module.repack()
            return still_valid()
        return True

    @contextlib.contextmanager
    def loading_weights(self):
        """Held while ``load_state_dict`` writes the parameters: a concurrent call that notices waits for
        the new packs, and one computing on the parameters meanwhile is redone (``modules/dispatch.py``)."""
        with self.lock:
            self.loads += 1
            self.loading_thread = threading.get_ident()
            self.loading = True
            try:
                yield
            finally:
                self.loading, self.loading_thread = False, None
                self.loads += 1

    def zero_state(self, input: Tensor, dims: int, batch_first: bool, hidden_size: int,
                   batch: Optional[int] = None) -> Tensor:
        """A cached zero state for ``run_onednn`` (dims=3), ``run_cells`` or an LSTMCell (dims=2, ``batch``
        rows): the kernels only read their states, so one tensor serves every call of the same batch size
        and dtype."""
        if batch is None:
            batch = input.size(0 if batch_first else 1) if input.dim() == 3 else 1
        zeros = self.zeros
        shape = (1, batch, hidden_size) if dims == 3 else (batch, hidden_size)
        if zeros.shape != shape or zeros.dtype != input.dtype:
            zeros = self.zeros = torch.zeros(shape, dtype=input.dtype)
        return zeros


def _expected_shapes(module: nn.LSTM) -> list[tuple[int, ...]]:
    gates, shapes = 4 * module.hidden_size, []
    for layer in module.packed_layers:
        shapes += [(gates, layer.input_size), (gates, module.proj_size or module.hidden_size)]
        shapes += [(gates,), (gates,)] if module.bias else []
        shapes += [(module.proj_size, module.hidden_size)] if module.proj_size > 0 else []
    return shapes


class PackedModule:
    """The base of every packed module (``PackedLSTM`` and the ``OneKernel`` modules): a mixin before the
    torch class, which names its weights. Its ``nn.Module`` hooks make the packs follow the weights:
    ``.to()`` and friends, ``load_state_dict`` (under the load seqlock) and a reassigned parameter all
    repack. Code outside ``lstmopt.modules`` asks ``isinstance(m, PackedModule)``, never for a kind."""

    def _weight_names(self):
        raise NotImplementedError

    # What tracing asks of every packed module it records (lstmopt.artifacts.tracing), declared here so that a new
    # kind cannot miss them.
    def use_stock_kernels(self) -> None:
        """The torch module's own path for every call (a trace then records its ops)."""
        raise NotImplementedError

    def scripted_for_trace(self) -> torch.jit.ScriptModule:
        """A scripted module with one tensor ``forward`` on the same parameters, for a traced caller."""
        raise NotImplementedError

    @torch.jit.unused  # Python only: a scripted module never asks
    def computes_in_low_precision(self) -> bool:
        """Whether its kernels compute in bf16 or int8 (``lstmopt.job.low_precision`` measures their error)."""
        return False

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.repack()  # .to() and friends may change the dtype, the device or the tensors themselves
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        with self._state.loading_weights():
            super()._load_from_state_dict(*args, **kwargs)
            self.repack()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, nn.Parameter) and name in self._weight_names():
            state = self.__dict__.get("_state")
            if state is not None and not state.loading:
                self.repack()


class OneKernel(PackedModule):
    """A packed module with one kernel in use, one of its class's ``KERNELS`` (``PackedLSTMCell``,
    ``PackedGRUCell``, ``PackedGRU``): how it is set up, switched, packed and pickled. The class names its
    packed weights (``_packed_names``, and ``_weights_by_name`` in TorchScript), what keeps it off the
    native kernel (``_native_obstacle``) and its packs (``_new_native_packs``)."""

    KERNELS: tuple = ()  # names from the kernel table, for this class's inputs
    INPUTS = ""  # those inputs: kernel_table.CELL, GRU_CELL or GRU

    @classmethod
    def _become(cls, module: nn.Module, kernel: str):
        """``module`` itself as an instance of ``cls`` running ``kernel`` (its identity, hooks and sharing kept;
        the caller checked that it can be)."""
        if isinstance(module, cls):
            module.use_kernel(kernel)
        else:
            module.__class__ = cls
            module._init_packing(kernel)
        return module

    def _init_packing(self, kernel: str) -> None:
        self._check_kernel(kernel)
        self.kernel = kernel
        self.autotune_ms: Optional[dict] = None
        self.autotune_notes: dict = {}
        self._state = PackState()
        self.repack()

    def _check_kernel(self, kernel: str) -> None:
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(self.KERNELS)}, got {kernel!r}")

    @property
    def uses_native_kernel(self) -> bool:
        """Whether the native kernel is in use (a TorchScript archive then needs ``native.LOAD_LINE``)."""
        return "native_packs" in self.__dict__

    @torch.jit.export
    def repack(self) -> None:
        """Pack the current weights again (see ``PackedLSTM.repack``). Scripted, only the native packs, made
        as the ones they replace were, from ``_weights_by_name``."""
        if not torch.jit.is_scripting():
            self._refresh()
            return
        if hasattr(self, "native_packs"):
            old = self.native_packs
            self.native_packs = NativePacks([w.detach() for w in self._weights_by_name()], old.hidden_size,
                                            old.num_layers, old.bidirectional, old.has_biases, old.proj_size, old.cell)

    def _refresh(self) -> None:
        """The native kernel's packs while it is in use (the only kernel of these classes that reads packs),
        from ``_new_native_packs`` of the parameters ``_packed_names``, where ``_native_obstacle`` is None."""
        state = self._state
        with state.lock:
            if self.kernel == "native" and not native.load():  # load() said why, in one line
                self.kernel = kernel_table.names(self.INPUTS, exact_only=True)[0]
            names = self._packed_names()
            weights = [self._parameters.get(name) for name in names]
            packs = handle = None
            if self.kernel == "native" and all(w is not None for w in weights) and self._native_obstacle() is None:
                try:
                    packs = self._new_native_packs(weights)
                    handle = native.module().Packs(packs.weights, packs.biases, [], self.hidden_size, 0,
                                                   packs.bidirectional, packs.cell, names, weights)
                except RuntimeError:  # weights reassigned with other shapes: the torch module's path judges them
                    packs = handle = None
            # Concurrent calls read state.native once per call: it goes from the old packs to the new ones.
            if packs is None:
                self.__dict__.pop("native_packs", None)
                state.native, state.packed_from = None, []
                return
            self.native_packs = packs
            state.native = handle
            # Last: until it is set, a call finds the packs stale and waits on the lock for this refresh.
            state.packed_from = [(name, w, version_of(w), w.data_ptr()) for name, w in zip(names, weights)]

    def use_stock_kernels(self) -> None:
        """The torch module's own path for every call (a trace then records its ops)."""
        self.use_kernel("stock")

    def scripted_for_trace(self) -> torch.jit.ScriptModule:
        """Its scripted self (one signature: it serves a traced caller as it is)."""
        return torch.jit.script(self)

    def use_kernel(self, kernel: str) -> None:
        """Switch to another of ``KERNELS`` (``"stock"``: the torch module's own forward)."""
        self._check_kernel(kernel)
        with self._state.lock:
            self.kernel = kernel
            self.repack()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_state", None)  # a lock and the native library's handle: rebuilt on load
        state.pop("native_packs", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._state = PackState()
        self.repack()
