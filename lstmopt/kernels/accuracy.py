"""The approximate-kernel contract: what "not bit-identical, but as accurate as eager" means.

An absolute tolerance cannot be the contract: fp32 rounding error grows with the weights' magnitude,
saturated gates and the sequence length, so trained weights (|w| up to 3) put eager ``nn.LSTM`` itself
1e-6 away from the true result. As numerical libraries do, lstmopt measures against a float64
reference of the same model on the same inputs: an approximate kernel's largest error is at most
``FACTOR`` times eager fp32's own largest error there. Eager can be unusually exact on an output (an
error of a few ulps, or none), so its error counts as at least one fp32 ulp of the output's scale, and
that scale as at least 1: an LSTM's gates and states live in [-1, 1] (the cell state grows slowly beyond),
so a kernel's rounding there is of ulp(1) whatever the magnitude of one small output.

``FACTOR`` is measured, not assumed: over 768 LSTM configurations (1-2 layers, both directions, 40-128
inputs, 64-256 hidden, weights at 1-8x PyTorch's initial scale with and without saturating biases, 1-200
steps, batch 1 and 4), the native kernel's error was at most 4.5x eager's and the cell kernel's 2.8x
(median 1.25x and 1.0x); 8 leaves room for what those configurations missed. The property tests in
``tests/test_accuracy.py`` hold every approximate kernel to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the CLI's help reads CONTRACT, and must not import torch
    from torch import Tensor

__all__ = ["CONTRACT", "FACTOR", "Accuracy", "accuracy", "max_error"]

FACTOR = 8.0
CONTRACT = f"within {FACTOR:g}x eager fp32's own error against float64"
_ULP = 2.0 ** -23  # float32's spacing at 1


class Accuracy(NamedTuple):
    """One output against its float64 reference: eager fp32's error, the kernel's error, and the bound."""

    eager_error: float
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def accuracy(eager: Tensor, actual: Tensor, reference: Tensor) -> Accuracy:
    """How ``actual`` (the approximate kernel's output) and ``eager`` (nn.LSTM's, fp32) compare with
    ``reference`` (the same computation in float64). NaN where the reference has none is an infinite error.

    Example:
        >>> result = accuracy(lstm(x)[0], packed(x)[0], lstm_f64(x.double())[0])
        >>> result.ok  # the packed kernel is within FACTOR x eager's error
        True
    """
    reference = reference.detach().double()
    scale = float(reference.abs().nan_to_num(nan=0.0).max()) if reference.numel() else 0.0
    eager_error, error = (max_error(t, reference) for t in (eager, actual))
    return Accuracy(eager_error, error, FACTOR * max(eager_error, _ULP * max(1.0, scale)))


def max_error(t: Tensor, reference: Tensor) -> float:
    """The largest absolute difference of ``t`` from ``reference`` (float64); NaN where the reference has
    none is infinite."""
    if t.numel() == 0:
        return 0.0
    t = t.detach().double()
    both_nan = t.isnan() & reference.isnan()
    diff = (t - reference).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=float("inf"))
    return float(diff.max())
