"""What can be packed for oneDNN, and the packs: one layer and direction's weights, laid out once.

``mkldnn._reorder_mkldnn_rnn_layer_weight`` lays a layer's two weight matrices out in the blocked format
oneDNN's LSTM primitive reads (``abdEc32e`` on AVX-512, ``abdEc16e`` on AVX2): the work eager ``nn.LSTM``
repeats on every call. The packs are opaque tensors whose layout depends on the CPU, so they are never
serialized: ``LayerPacks`` stores the dense matrices and packs again wherever it is loaded.
"""

# No "from __future__ import annotations": TorchScript needs real annotations on the class attributes.
import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from lstmopt.kernels import native
from lstmopt.kernels.tensor_versions import sources_of, unchanged_since, version_of

__all__ = ["NO_EXACT_PROJECTION", "PACKABLE_DTYPES", "LayerPacks", "PackedLayer", "bf16_supported", "dtype_name",
           "shallow_as", "calls_lstm_forward", "native_obstacle", "own_forward", "packing_obstacle", "pickles_its_own_way", "tracked_copy",
           "sources_of", "unchanged_since", "version_of", "weights_obstacle"]

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
NO_EXACT_PROJECTION = ("proj_size>0 has no exact kernel (oneDNN has no projection); --approx runs it on "
                       "lstmopt's native kernel")


def bf16_supported() -> bool:
    """Whether this CPU runs oneDNN bf16 natively (emulated bf16 is slower than fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: as reasons, reports and the CLI name dtypes."""
    return str(dtype).removeprefix("torch.")


def weights_obstacle(weights: List[Tensor], dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why these LSTM weights (converted to ``dtype`` if given) cannot be packed, or None if they can."""
    devices = {w.device for w in weights}
    if devices != {torch.device("cpu")}:
        where = ", ".join(sorted(str(d) for d in devices))
        return f"weights are on {where}; oneDNN packing is CPU-only"
    dtypes = {dtype} if dtype is not None else {w.dtype for w in weights}
    if len(dtypes) != 1:
        return "weights have mixed dtypes " + ", ".join(sorted(dtype_name(d) for d in dtypes))
    target = dtypes.pop()
    if target not in PACKABLE_DTYPES:
        return f"dtype {dtype_name(target)} is not supported by the packed kernel (float32, bfloat16)"
    if target == torch.bfloat16 and not bf16_supported():
        return "this CPU has no native bf16 support in oneDNN"
    if any(type(w) is not nn.Parameter and type(w) is not Tensor for w in weights):
        return "weights are tensor subclasses"
    return None


def packing_obstacle(lstm: nn.Module, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why ``lstm`` (converted to ``dtype`` if given) cannot become a ``PackedLSTM``, or None if it can.

    A ``proj_size > 0`` LSTM can be packed, but only for the kernels that serve it (the native kernel,
    not exact: ``NO_EXACT_PROJECTION``).

    Example:
        >>> packing_obstacle(nn.LSTM(40, 128, num_layers=2))  # None: it can
        >>> packing_obstacle(nn.GRU(40, 128))
        'GRU is not an nn.LSTM'
    """

    if not isinstance(lstm, nn.LSTM):
        return f"{type(lstm).__name__} is not an nn.LSTM"
    own = own_forward(type(lstm))
    if own is not None and not calls_lstm_forward(own):
        return (f"{type(lstm).__qualname__} subclasses nn.LSTM with a forward that does not call nn.LSTM's "
                "(super().forward): packing would bypass its own code")
    if lstm.input_size == 0 or lstm.hidden_size == 0:
        return "input_size or hidden_size is 0"
    computed = [name for name in lstm._flat_weights_names if name not in lstm._parameters]
    if computed:  # e.g. torch.nn.utils.weight_norm recomputes the weight in a forward pre-hook
        return f"{computed[0]} is not a parameter (computed by a hook such as weight_norm)"
    if dtype is not None and dtype not in PACKABLE_DTYPES:
        return f"dtype {dtype_name(dtype)} is not supported by the packed kernel (float32, bfloat16)"
    return weights_obstacle([lstm._parameters[name] for name in lstm._flat_weights_names], dtype)


def native_obstacle(weights: List[Tensor]) -> Optional[str]:
    """Why lstmopt's native kernel cannot run on these weights here, or None if it can."""
    obstacle = weights_obstacle(weights, torch.float32)
    if obstacle is None and weights[0].dtype != torch.float32:
        obstacle = "the native kernel computes in float32 only"
    if obstacle is None and not native.available():
        obstacle = f"the native kernel is unavailable ({native.unavailable_reason()})"
    return obstacle


def own_forward(cls: type):
    """The ``forward`` a subclass of nn.LSTM defines for itself (the first in its MRO before nn.LSTM's), or
    None for nn.LSTM and lstmopt's own classes, which are marked ``_is_packed_lstm`` in their class body."""
    for klass in cls.__mro__:
        if klass is nn.LSTM or vars(klass).get("_is_packed_lstm", False):
            return None
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


def calls_lstm_forward(function) -> bool:
    """Whether ``function`` calls nn.LSTM's forward on its way (``super().forward(...)`` or
    ``nn.LSTM.forward(self, ...)``), read from its bytecode: then a packed LSTM under it runs the subclass's
    own code around the packed kernel. A forward that calls the op itself (``_VF.lstm``) does not qualify."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    codes = [code]
    while codes:  # and the functions defined inside it
        code = codes.pop()
        if "forward" in code.co_names and ({"super", "LSTM"} & set(code.co_names)):
            return True
        codes += [c for c in code.co_consts if hasattr(c, "co_names")]
    return False


def shallow_as(cls, module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (the same parameters) as an instance of ``cls``. Not by ``__class__``
    assignment, which Python refuses where the layouts differ, as from a subclass of an ``abc.ABC`` nn.LSTM
    subclass (pytorch-forecasting's ``LSTM``)."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


def tracked_copy(obj):
    """``copy.deepcopy`` made outside inference mode, even when called inside it: the copy's tensors are
    normal tensors, whose in-place changes can be seen (and which autograd accepts later).

    A parameter that was an inference tensor (a model built inside ``torch.inference_mode()``) is copied
    with ``requires_grad=False``: autograd never took the original either, and a normal tensor that
    requires grad sends ``matmul`` down another path (it folds a non-contiguous batch otherwise), whose last
    bits differ on some CPUs: the copy's other layers would not compute what the original's do.

    Real models need two more things of a copy (``_model_copy``): a tensor a module keeps from a forward
    run with autograd on (not a leaf, which ``deepcopy`` refuses) is copied detached; and a module whose
    class pickles itself its own way (flair's ``LanguageModel.__setstate__`` builds a new model from its
    constructor arguments) must not undo lstmopt's modules inside it."""
    with torch.inference_mode(False):
        copied = _model_copy(obj) if isinstance(obj, nn.Module) else copy.deepcopy(obj)
    if isinstance(obj, nn.Module):
        for original, copy_ in zip(obj.parameters(), copied.parameters()):
            if original.is_inference():
                copy_.requires_grad_(False)
    return copied


def _model_copy(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model, _detached_intermediates(model))
    if _swapped(copied) == _swapped(model):
        return copied
    # A class's own pickling undid them: copy the modules that hold them by their __dict__, as
    # nn.Module's own pickling does (the memo hands deepcopy an empty shell for each, filled after).
    memo = _detached_intermediates(model)
    shells = {id(m): m for m in model.modules() if pickles_its_own_way(type(m)) and _swapped(m)}
    for key, module in shells.items():
        memo[key] = type(module).__new__(type(module))
    copied = copy.deepcopy(model, memo)
    for key, module in shells.items():
        memo[key].__dict__.update(copy.deepcopy(module.__dict__, memo))
    return copied


def _swapped(model: nn.Module) -> list:
    """The names and classes of the lstmopt modules in ``model``."""
    return [(name, type(m)) for name, m in model.named_modules() if type(m).__module__.startswith("lstmopt.")]


def pickles_its_own_way(cls: type) -> bool:
    """Whether ``cls`` (or a base outside torch and lstmopt) defines how its instances are pickled or copied."""
    for hook in ("__getstate__", "__setstate__", "__reduce__", "__reduce_ex__", "__deepcopy__"):
        owner = next((base for base in cls.__mro__ if hook in vars(base)), object)
        if not owner.__module__.split(".")[0] in ("torch", "lstmopt", "builtins"):
            return True
    return False


def _detached_intermediates(model: nn.Module) -> dict:
    """A deepcopy memo mapping each non-leaf tensor a module of ``model`` keeps (a forward run with autograd
    on leaves some behind) to a detached copy: ``deepcopy`` refuses non-leaf tensors."""
    memo: dict = {}
    for module in model.modules():
        for value in module.__dict__.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, Tensor) and not item.is_leaf:
                    memo[id(item)] = item.detach().clone()
    return memo


def _reorder(weight_ih: Tensor, weight_hh: Tensor, hidden_size: int, reverse: bool, has_biases: bool) -> List[Tensor]:
    return torch.ops.mkldnn._reorder_mkldnn_rnn_layer_weight(weight_ih, weight_hh, hidden_size, reverse, has_biases,
                                                            False)


class LayerPacks:
    """One layer and direction's weights as the packed op reads them: the two weight matrices packed for
    oneDNN (with the dense matrices they came from) and a copy of the two biases.

    A TorchScript class (compiled when a scripted module holds one), not module attributes, for two
    reasons: its ``__getstate__`` stores the dense matrices and its ``__setstate__`` packs them again on
    the loading machine, also where ``torch.jit.freeze`` folded the object into a constant of a frozen
    module (which torch.jit.save can then store, unlike a folded opaque tensor); and a call only reads
    it, so concurrent calls never race. The dense matrices are the very tensors of the owner's
    parameters (sharing their memory), so an archive stores them once; the biases are copied so that a
    call running while ``load_state_dict`` writes the parameters sees the old weights whole.

    ``sources`` records the data pointer and version of each source tensor when packed, so the owner can
    tell whether the packs still hold the weights' current values.
    """

    def __init__(self, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor, hidden_size: int,
                 reverse: bool, has_biases: bool):
        packed = _reorder(weight_ih, weight_hh, hidden_size, reverse, has_biases)
        self.weight_ih = weight_ih
        self.weight_hh = weight_hh
        self.bias_ih = bias_ih.clone()
        self.bias_hh = bias_hh.clone()
        self.hidden_size = hidden_size
        self.reverse = reverse
        self.has_biases = has_biases
        self.packed_ih = packed[0]
        self.packed_hh = packed[1]
        self.sources = sources_of([weight_ih, weight_hh, bias_ih, bias_hh])

    def is_current(self, weights: List[Tensor]) -> bool:
        """Whether the packs were made from these very tensors (weight_ih, weight_hh, bias_ih, bias_hh),
        unchanged since."""
        return unchanged_since(self.sources, weights)

    def __getstate__(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, bool, bool]:
        return (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.hidden_size, self.reverse,
                self.has_biases)

    def __setstate__(self, state: Tuple[Tensor, Tensor, Tensor, Tensor, int, bool, bool]) -> None:
        packed = _reorder(state[0], state[1], state[4], state[5], state[6])
        self.weight_ih = state[0]
        self.weight_hh = state[1]
        self.bias_ih = state[2]
        self.bias_hh = state[3]
        self.hidden_size = state[4]
        self.reverse = state[5]
        self.has_biases = state[6]
        self.packed_ih = packed[0]
        self.packed_hh = packed[1]
        self.sources = sources_of([state[0], state[1], state[2], state[3]])


class PackedLayer(nn.Module):
    """One layer in one direction of a ``PackedLSTM``: its sizes, and its ``LayerPacks`` when the kernel in
    use reads packs (None otherwise)."""

    input_size: int
    hidden_size: int
    reverse: bool
    has_biases: bool
    packs: Optional[LayerPacks]

    def __init__(self, input_size: int, hidden_size: int, reverse: bool, has_biases: bool) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.reverse = reverse
        self.has_biases = has_biases
        self.packs = None

    @torch.jit.export
    def pack(self, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> None:
        """Pack these dense weights (the matrices are kept as the packs' source, not copied)."""
        self.packs = LayerPacks(weight_ih, weight_hh, bias_ih, bias_hh, self.hidden_size, self.reverse,
                                self.has_biases)

    @torch.jit.export
    def clear(self) -> None:
        self.packs = None

    @torch.jit.export
    def is_current(self, weights: List[Tensor]) -> bool:
        packs = self.packs
        return packs is not None and packs.is_current(weights)

    @torch.jit.export
    def is_packed(self) -> bool:
        """Whether this layer holds oneDNN packs (callable on a loaded archive, where reading ``packs`` from
        Python needs the LayerPacks class importable)."""
        packs = self.packs
        return packs is not None and packs.packed_ih.is_mkldnn and packs.packed_hh.is_mkldnn

    def __getstate__(self):
        # Python pickling and deepcopy: the owner packs again once its parameters are restored.
        state = self.__dict__.copy()
        state["packs"] = None
        return state

    def extra_repr(self) -> str:
        direction = "reverse" if self.reverse else "forward"
        return f"{self.input_size}, {self.hidden_size}, {direction}, {'packed' if self.is_packed() else 'not packed'}"
