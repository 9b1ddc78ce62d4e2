"""The sizes lstmopt generates inputs at: two batch sizes x two lengths around the ones given, within a bound.

``--input-shape`` and ``--input`` share them (``lstmopt.job.samples``, ``lstmopt.job.input_specs``).
"""

from __future__ import annotations

from typing import Sequence

from lstmopt.errors import UsageError

__all__ = ["MAX_SHAPE_VALUES", "check_shape_size", "shape_grid"]

# Generated inputs are made whole in memory, twice over (the model runs on them in two processes): a
# shape beyond this many values is a typo or a model lstmopt cannot check here, not a test input.
MAX_SHAPE_VALUES = 1 << 28  # 1 GiB of float32


def check_shape_size(dims: Sequence[int], what: str) -> None:
    values = 1
    for d in dims:
        values *= d
    if values > MAX_SHAPE_VALUES:
        raise UsageError(f"{what} asks for inputs of {values:.3g} values ({values * 4 / 2**30:.3g} GiB of float32), "
                         f"over the {MAX_SHAPE_VALUES * 4 >> 30} GiB lstmopt generates; give a smaller batch or "
                         "length (the LSTMs are checked at other sizes anyway), or pass --example-inputs")


def shape_grid(shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Two batch sizes x two sequence lengths around the given (B, T, F), largest first."""
    batch, steps, features = shape
    batches = sorted({batch, 1 if batch > 1 else 2}, reverse=True)
    lengths = sorted({steps, max(1, steps // 4) if steps > 1 else 2}, reverse=True)
    return [(b, t, features) for b in batches for t in lengths]
