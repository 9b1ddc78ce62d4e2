"""``Decision``: what ``optimize`` does with one recurrent module of a model, and why (``plan`` returns them; reports,
tables and autotune read them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

from torch import nn

__all__ = ["Decision", "FilterFn"]

FilterFn = Callable[[nn.Module, str], bool]
"""Called with (module, qualified name); return False to keep that LSTM as it is."""


@dataclass(frozen=True)
class Decision:
    """What ``optimize`` does with one ``nn.LSTM`` of a model, and why."""

    name: str  # qualified name in the model; "" when the model is the LSTM itself
    aliases: tuple[str, ...]  # further names of the same module when it is shared
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    proj_size: int
    dtype: str  # of the weights as found
    packed: bool
    packed_dtype: Optional[str]  # what the packed weights are stored in
    exact: bool  # results bit-identical to the module as found
    reason: str
    kernel: Optional[str] = None  # for tensor inputs: "onednn", "cell", "native" or "stock" once packed
    autotune_ms: Optional[dict] = None  # measured ms per kernel, when autotune chose the kernel
    sequence_kernel: Optional[str] = None  # for PackedSequence inputs: "stock", "onednn" or "native"
    sequence_autotune_ms: Optional[dict] = None
    kind: str = "LSTM"  # or "LSTMCell", "GRUCell" (one layer, one direction, one step per call), "GRU" or "RNN"
    # bf16, int8: the largest error of its outputs against fp32, and on which inputs (lstmopt.job.low_precision)
    error_vs_fp32: Optional[float] = None
    error_inputs: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)
