"""torch.ao's dynamic-quantized recurrent modules, turned into lstmopt's on the weights they hold.

``torch.ao.quantization.quantize_dynamic`` swaps a model's ``nn.LSTM``, ``nn.GRU``, ``nn.LSTMCell`` and
``nn.GRUCell`` for ``torch.ao.nn.quantized.dynamic`` modules with qint8 (or float16) weights packed for
FBGEMM. torch.ao is deprecated and nothing replaces it for recurrent layers; lstmopt takes such a module's
weights (``get_weight()``, dequantized exactly) into the torch module they came from and runs that on its
fastest kernel for them: an LSTM with qint8 weights on the native kernel's int8 weights (requantized per
gate row: finer than torch.ao's one scale per matrix), everything else on the native kernel in fp32, where
the dequantized weights are exact. Neither is what torch.ao computes (it also quantizes activations to
8 bits), so the job measures each module's error against the quantized original and verifies the artifact
within it (``lstmopt.job.low_precision``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lstmopt.choices import QUANTIZED_DTYPES
from lstmopt.modules.packs import dtype_name

__all__ = ["QUANTIZED_DTYPES", "dequantized", "is_quantized", "obstacle", "quantized_classes", "quantized_dtype", "quantized_kind",
           "weight_count"]


def _classes() -> dict:
    import torch.ao.nn.quantized.dynamic as dynamic

    return {dynamic.LSTM: ("LSTM", nn.LSTM), dynamic.GRU: ("GRU", nn.GRU),
            dynamic.LSTMCell: ("LSTMCell", nn.LSTMCell), dynamic.GRUCell: ("GRUCell", nn.GRUCell)}


def quantized_classes() -> tuple[type, ...]:
    """torch.ao's dynamic-quantized LSTM, GRU, LSTMCell and GRUCell classes."""
    return tuple(_classes())


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.ao's dynamic-quantized LSTM, GRU, LSTMCell or GRUCell."""
    return type(module).__module__.startswith("torch.ao.nn.quantized.dynamic") and type(module) in _classes()


def quantized_kind(module: nn.Module) -> str:
    """"LSTM", "GRU", "LSTMCell" or "GRUCell"."""
    return _classes()[type(module)][0]


def quantized_dtype(module: nn.Module) -> str:
    """What its weights are: "qint8" or "float16"."""
    dtype = getattr(module, "dtype", None) or getattr(module, "weight_dtype", None)
    return dtype_name(dtype)


def dequantized(module: nn.Module) -> nn.Module:
    """The torch module ``module`` was quantized from, holding its weights dequantized (exactly: a qint8
    weight is its integers times its scale; a float16 one widened), in eval mode."""
    kind, torch_class = _classes()[type(module)]
    if kind in ("LSTM", "GRU"):
        plain = torch_class(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                            batch_first=module.batch_first, bidirectional=module.bidirectional,
                            dropout=module.dropout)
    else:
        plain = torch_class(module.input_size, module.hidden_size, bias=module.bias)
    tensors = {**module.get_weight(), **{k: v for k, v in module.get_bias().items() if v is not None}}
    with torch.no_grad():
        for name, value in tensors.items():
            value = value.dequantize() if value.is_quantized else value
            getattr(plain, name).copy_(value.to(torch.float32))
    return plain.eval()


def weight_count(module: nn.Module) -> int:
    """The weights ``module`` holds: its parameters, and the packed weights of torch.ao's recurrent modules in it
    (which are no parameters)."""
    count = sum(p.numel() for p in module.parameters())
    for inner in module.modules():
        if is_quantized(inner):
            count += sum(t.numel() for part in (inner.get_weight(), inner.get_bias())
                         for t in part.values() if t is not None)
    return count


def obstacle(module: nn.Module) -> Optional[str]:
    """Why lstmopt keeps ``module`` as torch.ao made it, or None."""
    from lstmopt.kernels import native

    if quantized_dtype(module) not in QUANTIZED_DTYPES:
        return f"torch.ao dynamic-quantized with {quantized_dtype(module)} weights, which lstmopt does not read"
    if not native.load(quiet=True) and quantized_kind(module) != "LSTM":
        return (f"lstmopt's native kernel is unavailable here ({native.unavailable_reason()}), and torch.ao's own "
                f"{quantized_kind(module)} is faster than the fp32 one lstmopt would run instead")
    return None
