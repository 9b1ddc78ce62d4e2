"""Sample inputs for verification and benchmarks: from a user's file, or generated from a shape.

An example-inputs file is ``torch.save(samples)`` where ``samples`` is a list of examples, each a tuple of
the model's positional forward arguments (a lone tensor stands for a one-argument tuple). It is loaded
with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lstmopt.errors import UsageError

__all__ = ["Sample", "describe", "load_samples", "parse_shape", "recorded_calls", "samples_for", "samples_from_shape",
           "shape_grid"]

Sample = tuple  # positional arguments of one forward call

# Generated inputs are made whole in memory, twice over (the model runs on them in two processes): a
# shape beyond this many values is a typo or a model lstmopt cannot check here, not a test input.
MAX_SHAPE_VALUES = 1 << 28  # 1 GiB of float32


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"B,T,F"`` -> (B, T, F), all positive."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(f"--input-shape must be three positive integers B,T,F (batch, time, features), got {text!r}")
    check_shape_size(dims, f"--input-shape {text}")
    return dims  # type: ignore[return-value]


def check_shape_size(dims: Sequence[int], what: str) -> None:
    values = dims[0] * dims[1] * dims[2]
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


def samples_from_shape(shape: Sequence[int], *, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Sample]:
    """Random (batch, time, features) inputs over ``shape_grid(shape)``."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(dims, generator=generator, dtype=dtype),) for dims in shape_grid(shape)]


def samples_for(example_inputs: Optional[Path], input_shape: Optional[Sequence[int]]) -> list[Sample]:
    """The samples a job checks and times: the user's file, or inputs generated from a shape, or none."""
    if example_inputs is not None and input_shape is not None:
        raise UsageError("give either example inputs or an input shape, not both")
    if example_inputs is not None:
        return load_samples(example_inputs)
    if input_shape is not None:
        check_shape_size(tuple(input_shape), f"the input shape {','.join(map(str, input_shape))}")
        try:
            return samples_from_shape(input_shape)
        except (RuntimeError, MemoryError) as exc:  # within the cap, but more than this machine has
            raise UsageError(f"cannot allocate inputs of shape {','.join(map(str, input_shape))} here "
                             f"({' '.join(str(exc).split())[:120]}); give a smaller batch or length") from exc
    return []


def load_samples(path: Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"example inputs {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read example inputs {path} ({' '.join(str(exc).split())[:200]}); save them "
                         "with torch.save([(arg, ...), ...]) using tensors, tuples, lists and dicts only") from exc
    if isinstance(data, Tensor):
        samples = [(data,)]
    elif isinstance(data, tuple):
        samples = [data]
    elif isinstance(data, list) and data:
        samples = [s if isinstance(s, tuple) else (s,) for s in data]
    else:
        raise UsageError(f"example inputs {path} must hold a tensor, a tuple of arguments, or a non-empty list "
                         f"of such tuples; found {type(data).__name__}")
    for i, sample in enumerate(samples):
        if not _only_tensors(sample):
            raise UsageError(f"example input {i} in {path} holds something other than tensors, tuples, lists and "
                             "dicts with string keys")
    return samples


def _only_tensors(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, (tuple, list)):
        return all(_only_tensors(o) for o in obj)
    if isinstance(obj, dict):  # a batch dict, as neuralforecast's models take
        return all(isinstance(k, str) and _only_tensors(v) for k, v in obj.items())
    return obj is None or isinstance(obj, (int, float, bool))


def describe(sample: Sample) -> str:
    """A short shape description such as ``(8, 50, 40)`` or ``(4, 11) int64, (4,) int64``."""
    def one(obj: Any) -> str:
        if isinstance(obj, Tensor):
            dims = "(" + ", ".join(str(d) for d in obj.shape) + ("," if obj.dim() == 1 else "") + ")"
            return dims if obj.dtype == torch.float32 else f"{dims} {str(obj.dtype).removeprefix('torch.')}"
        if isinstance(obj, (tuple, list)):
            return "[" + ", ".join(one(o) for o in obj) + "]"
        if isinstance(obj, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in obj.items()) + "}"
        return repr(obj)
    return ", ".join(one(a) for a in sample)


def recorded_calls(model: torch.nn.Module, names: Sequence[str], samples: Sequence[Sample]) -> dict:
    """The calls each named submodule of ``model`` receives while the model runs ``samples`` (autograd off):
    per name, a list of (args, kwargs)."""
    calls: dict = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, kwargs, name=name: calls[name].append((args, kwargs)), with_kwargs=True)
        for name in names]
    try:
        with torch.no_grad():
            for args in samples:
                model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return calls
