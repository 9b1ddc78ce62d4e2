"""How far a low-precision model's results are from fp32: measured on the user's inputs, reported, and
the tolerance its verification uses, derived from what was measured.

``optimize(dtype=torch.int8)`` and ``dtype=torch.bfloat16`` change numerics by design, so their error is
a fact to report, not a bound to assume. Each low-precision LSTM is run beside its fp32 original on the calls the example inputs make it
receive (recorded from the original model) and on the synthetic inputs verification gives each LSTM
(``samples.lstm_cases``); the whole model on the examples. An artifact is then verified against
``TOLERANCE_FACTOR`` times the largest error measured (absolute; relative 0): the artifact must compute what
the in-process model computed, and that margin absorbs only a different thread split of the input
GEMMs, not a different quantization. ``--atol``/``--rtol`` override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from lstmopt.job.samples import recorded_calls
from lstmopt.job.samples import lstm_cases
from lstmopt.job.verify_child import flatten
from lstmopt.modules.pack_state import PackedModule

__all__ = ["TOLERANCE_FACTOR", "Measured", "low_precision_names", "measure"]

TOLERANCE_FACTOR = 4.0
# The floor of the derived tolerance, where everything measured was (nearly) exact: a model whose
# low-precision LSTMs' outputs do not reach its outputs, say.
MIN_ATOL = 1e-6


@dataclass
class Measured:
    """Errors against fp32: per low-precision LSTM (its outputs' max abs error, and on which inputs), and
    the model's."""

    lstms: dict = field(default_factory=dict)  # name -> {"max_abs_error", "inputs"}
    model_max_abs_error: Optional[float] = None  # on the example inputs; None without any
    largest: float = 0.0  # over everything measured, synthetic inputs included

    @property
    def tolerance(self) -> tuple[float, float]:
        return max(TOLERANCE_FACTOR * self.largest, MIN_ATOL), 0.0

    def to_dict(self) -> dict:
        atol, rtol = self.tolerance
        return {"lstms": self.lstms, "model_max_abs_error": self.model_max_abs_error, "atol": atol, "rtol": rtol,
                "factor": TOLERANCE_FACTOR}


def low_precision_names(model: nn.Module) -> list[str]:
    """The PackedLSTMs of ``model`` that compute in bf16 or int8: on the native kernel's low-precision packs,
    or on bf16 parameters (oneDNN's bf16)."""
    return [name for name, m in model.named_modules() if isinstance(m, PackedModule) and m.computes_in_low_precision()]


def _max_abs_error(expected, actual) -> float:
    worst = 0.0
    for (_, e), (_, a) in zip(flatten(expected), flatten(actual)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            diff = (a.float() - e.float()).abs()
            # a NaN where fp32 has a number is an infinite error; NaN where fp32 has NaN, none
            diff = torch.where(e.isnan() & a.isnan(), torch.zeros_like(diff), diff.nan_to_num(nan=float("inf")))
            worst = max(worst, diff.max().item() if diff.numel() else 0.0)
    return worst


def measure(original: nn.Module, optimized: nn.Module, samples: Sequence[tuple],
            names: Optional[Sequence[str]] = None) -> Measured:
    """Errors of ``optimized``'s low-precision LSTMs (or of the modules ``names``: those that replace torch.ao's
    quantized ones, say) and of the model against ``original``, in eval mode."""
    names = low_precision_names(optimized) if names is None else list(names)
    result = Measured()
    if not names:
        return result
    original.eval()
    optimized.eval()
    recorded = recorded_calls(original, names, samples)
    with torch.no_grad():
        for name in names:
            fp32, low = original.get_submodule(name), optimized.get_submodule(name)
            synthetic = max((_max_abs_error(fp32(*args), low(*args)) for args in lstm_cases(fp32)), default=0.0)
            on_examples = max((_max_abs_error(fp32(*args, **kwargs), low(*args, **kwargs))
                               for args, kwargs in recorded[name]), default=None)
            result.largest = max(result.largest, synthetic, on_examples or 0.0)
            result.lstms[name] = ({"max_abs_error": on_examples, "inputs": "example inputs"} if on_examples is not None
                                  else {"max_abs_error": synthetic, "inputs": "synthetic inputs"})
        if samples:
            result.model_max_abs_error = max(_max_abs_error(original(*args), optimized(*args)) for args in samples)
            result.largest = max(result.largest, result.model_max_abs_error)
    return result
