"""Sample inputs for verification and benchmarks: from a user's file or function, or generated from shapes, and
each recurrent module's own synthetic inputs (``lstm_cases``).

An example-inputs file is ``torch.save(samples)`` where ``samples`` is a list of examples, each a tuple of
the model's positional forward arguments (a lone tensor stands for a one-argument tuple). It is loaded
with ``weights_only=True``. Inputs that hold objects of the model's own classes (darts' ``PLModuleInput``
dataclass, say) come from a function in the user's code instead, named like a factory,
``package.module:function``, which returns that list. ``--input-shape`` generates (batch, time, features)
tensors; ``--input`` describes any tensor arguments, integer ids and lengths too (``lstmopt.job.input_specs``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from lstmopt.choices import names_a_function
from lstmopt.errors import UsageError, one_line
from lstmopt.job.grid import check_shape_size, shape_grid
from lstmopt.rewrite.quantized import is_quantized, quantized_kind

__all__ = ["Sample", "call_input", "describe", "load_samples", "lstm_cases", "only_tensors", "parse_shape", "recorded_calls",
           "samples_for", "samples_from_function", "samples_from_shape", "shape_grid"]

Sample = tuple  # positional arguments of one forward call

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


def samples_from_shape(shape: Sequence[int], *, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Sample]:
    """Random (batch, time, features) inputs over ``shape_grid(shape)``."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(dims, generator=generator, dtype=dtype),) for dims in shape_grid(shape)]


def samples_for(example_inputs: Optional[Union[Path, str]], input_shape: Optional[Sequence[int]],
                inputs: Optional[Sequence[str]] = None) -> list[Sample]:
    """The samples a job checks and times: the user's file or function, inputs generated from a shape or from
    ``--input`` specs, or none."""
    if sum(x is not None and x != [] for x in (example_inputs, input_shape, inputs)) > 1:
        raise UsageError("give one of example inputs, an input shape or input specs, not several")
    if inputs:
        from lstmopt.job.input_specs import parse_inputs, samples_from_specs

        return samples_from_specs(*parse_inputs(inputs))
    if example_inputs is not None:
        if names_a_function(str(example_inputs)):
            return samples_from_function(str(example_inputs))
        return load_samples(example_inputs)
    if input_shape is not None:
        check_shape_size(tuple(input_shape), f"the input shape {','.join(map(str, input_shape))}")
        try:
            return samples_from_shape(input_shape)
        except (RuntimeError, MemoryError) as exc:  # within the cap, but more than this machine has
            raise UsageError(f"cannot allocate inputs of shape {','.join(map(str, input_shape))} here "
                             f"({one_line(exc, 120)}); give a smaller batch or length") from exc
    return []


def samples_from_function(spec: str) -> list[Sample]:
    """The examples a user's function returns (a list of argument tuples, or one tuple, or one tensor)."""
    from lstmopt.artifacts.loading import load_factory

    function = load_factory(spec, what="--example-inputs")
    try:
        data = function()
    except Exception as exc:  # the user's code: report it, whatever it raised
        raise UsageError(f"--example-inputs {spec}() failed: {type(exc).__name__}: {one_line(exc)}") from exc
    return _as_samples(data, f"--example-inputs {spec}()", "returned")


def _as_samples(data: Any, where: str, verb: str) -> list[Sample]:
    if isinstance(data, Tensor):
        return [(data,)]
    if isinstance(data, tuple):
        return [data]
    if isinstance(data, list) and data:
        return [s if isinstance(s, tuple) else (s,) for s in data]
    raise UsageError(f"{where} must hold a tensor, a tuple of arguments, or a non-empty list of such tuples; "
                     f"it {verb} {type(data).__name__}")


def load_samples(path: Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"example inputs {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read example inputs {path} ({one_line(exc, 200)}); save them "
                         "with torch.save([(arg, ...), ...]) using tensors, tuples, lists and dicts only, or name a "
                         "function that returns them, --example-inputs package.module:function") from exc
    samples = _as_samples(data, f"example inputs {path}", "holds")
    for i, sample in enumerate(samples):
        if not only_tensors(sample):
            raise UsageError(f"example input {i} in {path} holds something other than tensors, tuples, lists and "
                             "dicts with string keys")
    return samples


def only_tensors(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, (tuple, list)):
        return all(only_tensors(o) for o in obj)
    if isinstance(obj, dict):  # a batch dict, as neuralforecast's models take
        return all(isinstance(k, str) and only_tensors(v) for k, v in obj.items())
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
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # a batch object: its set fields
            return f"{type(obj).__name__}(" + ", ".join(
                f"{f.name}={one(getattr(obj, f.name))}" for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None) + ")"
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return repr(obj)
        return type(obj).__name__  # never its repr, which may print the user's data
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


def call_input(args: tuple, kwargs: dict):
    """A recorded call's input, given by position or, as some models do (darts: ``lstm(input=x, hx=h)``), by
    keyword."""
    return args[0] if args else kwargs.get("input")


def lstm_cases(lstm: torch.nn.Module, *, seed: int = 0) -> list[tuple]:
    """Synthetic inputs for one recurrent module (torch's, or torch.ao's dynamic-quantized one): 2 lengths x 2
    batch sizes, once with initial states (for a cell: batches of 1 and 3, an unbatched step, and a step from
    given states). Only an LSTM's and an LSTMCell's state is a pair (h, c)."""
    generator = torch.Generator().manual_seed(seed)
    flat = getattr(lstm, "_flat_weights", None)
    dtype = flat[0].dtype if flat else getattr(getattr(lstm, "weight_ih", None), "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32  # torch.ao's weights: inputs stay fp32
    kind = _kind(lstm)
    pair = kind.startswith("LSTM")
    if kind.endswith("Cell"):
        unbatched = [] if is_quantized(lstm) else [(lstm.input_size,)]  # torch.ao's cells take batches only
        cases = [(torch.randn(shape, generator=generator, dtype=dtype),)
                 for shape in [(1, lstm.input_size), (3, lstm.input_size), *unbatched]]
        h, c = (torch.randn(3, lstm.hidden_size, generator=generator, dtype=dtype) for _ in range(2))
        return cases + [(cases[1][0], (h, c) if pair else h)]
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    cases = []
    for steps, batch in [(1, 1), (7, 1), (1, 3), (7, 3)]:
        shape = (batch, steps, lstm.input_size) if lstm.batch_first else (steps, batch, lstm.input_size)
        x = torch.randn(shape, generator=generator, dtype=dtype)
        cases.append((x,))
    h = torch.randn(states, 3, getattr(lstm, "proj_size", 0) or lstm.hidden_size, generator=generator,
                    dtype=dtype)  # an LSTMP's is proj_size wide
    if not pair:
        return cases + [(cases[-1][0], h)]
    c = torch.randn(states, 3, lstm.hidden_size, generator=generator, dtype=dtype)
    cases.append((cases[-1][0], (h, c)))
    return cases


def _kind(module: torch.nn.Module) -> str:
    """The torch class a module is, by name ("LSTM", "GRUCell", ...): of a subclass (lstmopt's packed modules, a
    user's), the torch class it derives from."""
    if is_quantized(module):
        return quantized_kind(module)
    return next(cls.__name__ for cls in type(module).__mro__ if cls.__module__ == torch.nn.LSTM.__module__)
