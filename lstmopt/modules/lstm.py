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

Which kernel serves a call is ``PackedLSTM.kernel`` (tensors) and ``.sequence_kernel`` (PackedSequences),
names from the kernel table (``lstmopt.kernels.table``, which says what each serves, whether it is exact
and what it needs); ``lstmopt.rewrite.autotune`` picks per module. The class holds construction and the
nn.Module hooks; a call's route is ``modules/dispatch.py`` (``modules/scripted.py`` in TorchScript), the
Python-only pack state ``modules/pack_state.py``, and the packs ``modules/packs.py``.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
import threading
from typing import Optional, Tuple, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmopt.kernels import table as kernel_table
from lstmopt.kernels.native import NativePacks
from lstmopt.modules import dispatch
from lstmopt.modules.guards import kernel_accepts
from lstmopt.modules.pack_state import PackedModule, PackState
from lstmopt.modules.packs import PackedLayer, packing_obstacle, shallow_as, tracked_copy
from lstmopt.modules.scripted import ScriptedPaths

__all__ = ["EXACT_KERNELS", "EXACT_SEQUENCE_KERNELS", "KERNELS", "PackedLSTM", "SEQUENCE_KERNELS", "TracedLSTM",
           "packed_subclass"]

# Names from the kernel table (lstmopt.kernels.table), which says what each serves and needs.
KERNELS = kernel_table.names(kernel_table.TENSOR)
SEQUENCE_KERNELS = kernel_table.names(kernel_table.SEQUENCE)
EXACT_KERNELS = kernel_table.names(kernel_table.TENSOR, exact_only=True)
EXACT_SEQUENCE_KERNELS = kernel_table.names(kernel_table.SEQUENCE, exact_only=True)


class PackedLSTM(PackedModule, ScriptedPaths, nn.LSTM):
    """Drop-in ``nn.LSTM`` for CPU inference on weights packed once for oneDNN (see the module docstring).

    Build one with ``PackedLSTM.from_lstm(lstm)`` (a copy), ``PackedLSTM(input_size, hidden_size, ...)``
    (like ``nn.LSTM``), or ``lstmopt.optimize(model)``. The fast kernel serves CPU tensors in the packed
    dtype in eval mode with autograd off (``torch.no_grad()``, ``torch.inference_mode()``); every other call
    (autograd on, training, autocast, other dtypes or devices, invalid input) takes nn.LSTM's own path on
    the same parameters.

    Args:
        *args, **kwargs: as ``nn.LSTM``. With ``proj_size > 0`` only the native kernel and nn.LSTM's
            own path serve calls (``use_kernel("native", sequence_kernel="native")``); it starts on stock.
        io_dtype: when set (``optimize(dtype=torch.bfloat16)`` sets it to float32), inputs arriving in
            ``io_dtype`` are cast to the weights' dtype and results cast back, so a bf16 LSTM can sit
            inside an fp32 model.

    Example:
        >>> lstm = PackedLSTM.from_lstm(nn.LSTM(40, 128, num_layers=2)).eval()
        >>> with torch.inference_mode():
        ...     output, (h, c) = lstm(torch.randn(16, 1, 40))
    """

    # Python-only: a scripted module cannot hold locks, Python tuples or object identities.
    __jit_ignored_attributes__ = ["_state", "autotune_ms", "sequence_autotune_ms", "autotune_notes", "_is_packed_lstm"]
    __jit_unused_properties__ = ["packed_layers", "uses_native_kernel", *nn.LSTM.__jit_unused_properties__]

    _is_packed_lstm = True  # packing_obstacle: this very class, not a subclass

    kernel: str  # the kernel table's name of the kernel for tensors (lstmopt.kernels.table)
    sequence_kernel: str  # and for PackedSequences
    # The dtype a call must be in to reach each fast kernel; None: that kernel cannot run on these weights.
    packed_dtype: Optional[torch.dtype]
    kernel_dtype: Optional[torch.dtype]
    sequence_dtype: Optional[torch.dtype]
    io_dtype: Optional[torch.dtype]
    # What the native kernel's packs hold: "float32", "bfloat16" or "int8" (optimize(dtype=...)); the
    # other kernels compute on the fp32 parameters either way.
    native_weights: str
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
        if isinstance(lstm, PackedLSTM):
            lstm.io_dtype = io_dtype
        else:
            lstm.__class__ = cls if type(lstm) is nn.LSTM else packed_subclass(type(lstm))
            lstm._init_packing(io_dtype)
        return lstm

    def _init_packing(self, io_dtype: Optional[torch.dtype]) -> None:
        self.io_dtype = io_dtype
        self.native_weights = "float32"
        # An LSTMP has no exact kernel but nn.LSTM's own (oneDNN has no projection).
        self.kernel = "stock" if self.proj_size > 0 else kernel_table.default(kernel_table.TENSOR)
        self.sequence_kernel = kernel_table.default(kernel_table.SEQUENCE)
        self.packed_dtype = self.kernel_dtype = self.sequence_dtype = None
        self.autotune_ms: Optional[dict] = None  # what autotune measured per kernel, for tensor calls
        self.sequence_autotune_ms: Optional[dict] = None  # and for PackedSequence calls
        self.autotune_notes: dict = {}  # autotune's verdict in words, per kind of input
        self._state = PackState()
        directions = 2 if self.bidirectional else 1
        output_size = self.proj_size or self.hidden_size
        self.packed_layers = nn.ModuleList(
            PackedLayer(self.input_size if layer == 0 else output_size * directions, self.hidden_size,
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

    def use_kernel(self, kernel: Optional[str] = None, *, sequence_kernel: Optional[str] = None,
                   native_weights: Optional[str] = None) -> None:
        """Switch the kernel for tensors (``KERNELS``) and/or for PackedSequences (``SEQUENCE_KERNELS``); the
        packs are kept only while a kernel in use reads them. ``native_weights``: what the native kernel
        computes with, ``"float32"``, ``"bfloat16"`` (weights rounded to bf16) or ``"int8"`` (weights rounded
        to int8 with a scale per gate row, activations to int16 per row; no projection: see
        ``lstmopt.kernels.native.NativePacks``).

        Example:
            >>> lstm.use_kernel("native", sequence_kernel="native")  # what --autotune --approx may pick
            >>> lstm.use_kernel("native", sequence_kernel="native", native_weights="int8")  # dtype=torch.int8
        """
        if native_weights is not None:
            weights = kernel_table.weights_format(native_weights)
            if self.proj_size > 0 and not weights.projection:
                raise ValueError(weights.projection_obstacle())
        projection = self.proj_size > 0
        kernels = kernel_table.names(kernel_table.TENSOR, projection=projection)
        sequence_kernels = kernel_table.names(kernel_table.SEQUENCE, projection=projection)
        serving = " for proj_size > 0" if projection else ""
        if kernel is not None and kernel not in kernels:
            raise ValueError(f"kernel must be one of {', '.join(kernels)}{serving}, got {kernel!r}")
        if sequence_kernel is not None and sequence_kernel not in sequence_kernels:
            raise ValueError(f"sequence_kernel must be one of {', '.join(sequence_kernels)}{serving}, "
                             f"got {sequence_kernel!r}")
        with self._state.lock:
            self.kernel = kernel or self.kernel
            self.sequence_kernel = sequence_kernel or self.sequence_kernel
            self.native_weights = native_weights or self.native_weights
            self.repack()

    @torch.jit.unused  # Python only: a scripted module never asks
    def serves(self, input, hx) -> bool:
        """Whether the kernel in use for this kind of call (tensor, PackedSequence) takes it itself rather than
        nn.LSTM's path: autotune asks it of every recorded call (inputs in ``io_dtype`` are cast first, as
        ``forward`` does). Python only."""
        sequence = isinstance(input, PackedSequence)
        kernel = self.sequence_kernel if sequence else self.kernel
        if kernel == "stock":
            return True
        data, weight_dtype = input.data if sequence else input, self._flat_weights[0].dtype
        if self._casts_at_boundary(data.dtype, weight_dtype):
            input = input.to(weight_dtype)
            hx = None if hx is None else tuple(h.to(weight_dtype) for h in hx)
        facts = kernel_table.find(kernel, kernel_table.SEQUENCE if sequence else kernel_table.TENSOR)
        return kernel_accepts(self, input, hx, self.sequence_dtype if sequence else self.kernel_dtype,
                              single_step_only=facts.single_step)

    def use_stock_kernels(self) -> None:
        """nn.LSTM's own path for every call (a trace then records its op, and the archive needs no packs)."""
        self.use_kernel("stock", sequence_kernel="stock")

    def scripted_for_trace(self) -> torch.jit.ScriptModule:
        """A scripted copy with one tensor forward (``TracedLSTM``) on the same parameters, for a traced caller."""
        return torch.jit.script(shallow_as(TracedLSTM, tracked_copy(self)))

    def packed_forward(self, *args, **kwargs):
        """``PackedLSTM.forward``, also where a subclass's own forward (``packed_subclass``) would run around it."""
        return PackedLSTM.forward(self, *args, **kwargs)

    @torch.jit.unused  # Python only: a scripted module never asks
    def computes_in_low_precision(self) -> bool:
        """On the native kernel's bf16 or int8 packs, or on bf16 parameters (oneDNN's bf16)."""
        return self.native_weights != "float32" or self._flat_weights[0].dtype != torch.float32

    # ---------------------------------------------------------------------------------------------
    # Keeping the packs in step with the parameters (lstmopt/modules/pack_state.py)

    @torch.jit.export
    def repack(self) -> None:
        """Pack the current weights again (when the kernel reads packs), or drop the packs.

        Runs after every change lstmopt is told of (``load_state_dict``, ``.to()``, reassignment) and
        before the first call after an in-place edit; call it yourself only to pay that cost up front.
        In a loaded TorchScript archive, which cannot repack during a call (concurrent calls would race),
        a scripted LSTM whose weights changed computes on nn.LSTM's path until ``repack()`` is called.
        """
        if not torch.jit.is_scripting():
            self._state.refresh(self)
            return
        self._scripted_repack()

    def _weight_names(self):
        return getattr(self, "_flat_weights_names", ())

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_state", None)  # a lock and views of the packs: rebuilt on load
        state.pop("native_packs", None)
        return state

    def __setstate__(self, state):
        for legacy in ("_loads", "_loading_thread", "_loading"):  # pickles of lstmopt <= 78d9f1b: now in _state
            state.pop(legacy, None)
        state.setdefault("native_weights", "float32")  # pickles from before int8
        super().__setstate__(state)
        self._state = PackState()
        self._state.refresh(self, force=False)  # the unpickled LayerPacks have packed already, from the same storage

    @torch.jit.export
    def flatten_parameters(self) -> None:
        """nn.LSTM's, a no-op on CPU (it compacts cuDNN's weight buffer). Exported, so that a scripted or
        traced PackedLSTM takes the call many wrappers make in their forward."""
        if not torch.jit.is_scripting():
            nn.LSTM.flatten_parameters(self)

    # ---------------------------------------------------------------------------------------------
    # Forward (lstmopt/modules/dispatch.py; in TorchScript, lstmopt/modules/scripted.py)

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
            return dispatch.forward(self, input, hx)
        if isinstance(input, PackedSequence):
            return self._scripted_sequence(input, hx)
        else:
            return self._scripted_tensor(input, hx)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", kernel={self.kernel}"
        if self.sequence_kernel != "stock":
            s += f", sequence_kernel={self.sequence_kernel}"
        if self.io_dtype is not None:
            s += f", io_dtype={self.io_dtype}"
        if self.native_weights != "float32":
            s += f", native_weights={self.native_weights}"
        return s


_subclasses: dict = {}
class TracedLSTM(PackedLSTM):
    """A ``PackedLSTM`` with one tensor ``forward`` (nn.LSTM's is overloaded, which a traced caller cannot
    call). Same parameters, names and kernels; only ever used scripted (``scripted_for_trace``)."""

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if not torch.jit.is_scripting():
            return PackedLSTM.forward(self, input, hx)
        return self._scripted_tensor(input, hx)

    @torch.jit.export
    def flatten_parameters(self) -> Tensor:  # type: ignore[override]
        """A no-op, as on CPU; it returns an empty tensor because a trace records the call and a traced
        call must return tensors (many wrappers call it in their forward, which is then traced)."""
        return torch.empty(0)


_subclasses_lock = threading.Lock()


def packed_subclass(base: type) -> type:
    """The class an instance of ``base``, a subclass of nn.LSTM whose forward calls nn.LSTM's, becomes when
    packed: ``(base, PackedLSTM)``, so the subclass's own forward (and every other method it overrides)
    runs, and its ``super().forward`` reaches the packed dispatch. One class per base. Its ``__qualname__``
    names the base, and ``lstmopt.modules.subclasses`` rebuilds the class from that name when a pickle
    (``torch.save`` of the model) is loaded, wherever the base class is importable.
    """
    with _subclasses_lock:
        packed = _subclasses.get(base)
        if packed is None:
            where = f"{base.__module__}/{base.__qualname__}".replace(".", ":")
            packed = type(base)(base.__name__, (base, PackedLSTM), {
                "_is_packed_lstm": True, "__module__": "lstmopt.modules.subclasses",
                "__qualname__": f"Packed[{where}]", "__doc__": base.__doc__, "packed_base": base})
            _subclasses[base] = packed
        return packed
