"""``--input`` specs: a model's forward arguments described on the command line or in a batch config.

One spec per positional argument::

    float32[B=8,T=100,40]          random normal values, batch 8, 100 steps, 40 features
    int64[T,B]:0..10000            token or character ids, uniform in [0, 10000)
    lengths[B]                     sequence lengths: the first T, the rest shorter, longest first
    (float32[1,B,256], float32[1,B,256])    a tuple argument, such as an LSTM's (h, c)

``B`` (batch) and ``T`` (time) are the dimensions lstmopt varies: like ``--input-shape``, the samples are 2
batch sizes x 2 lengths around the values given (each given once, as ``B=8``, ``T=100``, in any spec). Other
dimensions are numbers. Values are drawn from a fixed seed, so every run checks the same inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from lstmopt.errors import UsageError
from lstmopt.job.grid import check_shape_size, shape_grid

__all__ = ["TensorSpec", "parse_inputs", "samples_from_specs"]

DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                 "int16", "int8", "uint8", "bool")}
_TOKEN = re.compile(r"\s*(?:(?P<open>\()|(?P<close>\))|(?P<comma>,)|(?P<tensor>[a-z0-9]+\[[^\]]*\](?::[^,()]+)?))")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor argument: ``dtype`` (or "lengths"), ``dims`` (ints, or "B"/"T"), an integer range."""

    dtype: str
    dims: tuple
    low: int = 0
    high: int = 0


Spec = Union[TensorSpec, tuple]


def parse_inputs(texts: Sequence[str]) -> tuple[list[Spec], dict]:
    """The argument specs of ``texts`` (one per argument) and the values of B and T they give."""
    sizes: dict = {}
    specs = [_parse_argument(text, sizes) for text in texts]
    missing = {dim for spec in specs for dim in _symbols(spec)} - set(sizes)
    if missing:
        name = sorted(missing)[0]
        raise UsageError(f"--input: give {name} a value once, as {name}=N in one of the shapes "
                         f"(e.g. float32[B=8,T=100,40])")
    return specs, sizes


def _symbols(spec: Spec) -> set:
    if isinstance(spec, tuple):
        return set().union(*(_symbols(s) for s in spec))
    return {d for d in spec.dims if isinstance(d, str)}


def _parse_argument(text: str, sizes: dict) -> Spec:
    tokens, position = [], 0
    while position < len(text.rstrip()):
        match = _TOKEN.match(text, position)
        if not match:
            raise UsageError(f"--input {text!r}: cannot read it from character {position + 1}; write e.g. "
                             "float32[B=8,T=100,40], int64[B,T]:0..1000, lengths[B] or (float32[1,B,64], "
                             "float32[1,B,64])")
        tokens.append(match)
        position = match.end()
    spec, rest = _argument(tokens, text, sizes)
    if rest:
        raise UsageError(f"--input {text!r}: one argument per --input (a tuple in parentheses)")
    return spec


def _argument(tokens: list, text: str, sizes: dict):
    if not tokens:
        raise UsageError(f"--input {text!r}: an argument is missing")
    first, rest = tokens[0], tokens[1:]
    if first["tensor"]:
        return _tensor(first["tensor"], text, sizes), rest
    if not first["open"]:
        raise UsageError(f"--input {text!r}: expected a tensor or '(' at {first.group().strip()!r}")
    items = []
    while True:
        item, rest = _argument(rest, text, sizes)
        items.append(item)
        if rest and rest[0]["comma"]:
            rest = rest[1:]
            if rest and rest[0]["close"]:  # (x,) is a one-tuple
                return tuple(items), rest[1:]
            continue
        if rest and rest[0]["close"]:
            return tuple(items), rest[1:]
        raise UsageError(f"--input {text!r}: a '(' is not closed")


def _tensor(token: str, text: str, sizes: dict) -> TensorSpec:
    head, _, value_range = token.partition(":")
    dtype, _, dims_text = head.partition("[")
    dims = []
    for part in dims_text.rstrip("]").split(","):
        part = part.strip()
        name, equals, value = part.partition("=")
        if part.isdigit() and int(part) > 0:
            dims.append(int(part))
        elif name in ("B", "T") and (not equals or (value.isdigit() and int(value) > 0)):
            if equals:
                if sizes.get(name, int(value)) != int(value):
                    raise UsageError(f"--input {text!r}: {name} is given two values ({sizes[name]} and {value})")
                sizes[name] = int(value)
            dims.append(name)
        else:
            raise UsageError(f"--input {text!r}: a dimension must be a positive number, B or T (B=N, T=N give "
                             f"their values), not {part!r}")
    if dtype == "lengths":
        if len(dims) != 1 or value_range:
            raise UsageError(f"--input {text!r}: lengths take one dimension, the batch: lengths[B]")
        return TensorSpec("lengths", tuple(dims))
    if dtype not in DTYPES:
        raise UsageError(f"--input {text!r}: unknown dtype {dtype!r}; one of {', '.join(DTYPES)} or lengths")
    low = high = 0
    if not DTYPES[dtype].is_floating_point and dtype != "bool":
        bounds = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", value_range)
        if not bounds or int(bounds[1]) >= int(bounds[2]):
            raise UsageError(f"--input {text!r}: integers need their range as LOW..HIGH (HIGH excluded), e.g. "
                             f"{dtype}[B,T]:0..1000")
        low, high = int(bounds[1]), int(bounds[2])
    elif value_range:
        raise UsageError(f"--input {text!r}: only integer inputs take a range")
    return TensorSpec(dtype, tuple(dims), low, high)


def samples_from_specs(specs: Sequence[Spec], sizes: dict, *, seed: int = 0) -> list[tuple]:
    """One sample per (B, T) of the grid around ``sizes``, largest first (as ``--input-shape``'s)."""

    batch, steps = sizes.get("B", 1), sizes.get("T", 1)
    grid = [(b, t) for b, t, _ in shape_grid((batch, steps, 1))]
    if "B" not in sizes:
        grid = list(dict.fromkeys((batch, t) for _, t in grid))
    if "T" not in sizes:
        grid = list(dict.fromkeys((b, steps) for b, _ in grid))
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for b, t in grid:
        values = {"B": b, "T": t}
        for spec in _tensor_specs(specs):
            check_shape_size([values[d] if isinstance(d, str) else d for d in spec.dims],
                             f"--input {spec.dtype}[{','.join(map(str, spec.dims))}]")
        samples.append(tuple(_make(spec, values, generator) for spec in specs))
    return samples


def _tensor_specs(specs):
    for spec in specs:
        yield from (_tensor_specs(spec) if isinstance(spec, tuple) else (spec,))


def _make(spec: Spec, values: dict, generator: torch.Generator):
    if isinstance(spec, tuple):
        return tuple(_make(s, values, generator) for s in spec)
    shape = [values[d] if isinstance(d, str) else d for d in spec.dims]
    if spec.dtype == "lengths":
        (batch,) = shape
        longest = values.get("T", 1)
        lengths = torch.randint(1, longest + 1, (batch,), generator=generator)
        lengths[0] = longest
        return lengths.sort(descending=True).values
    dtype = DTYPES[spec.dtype]
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(spec.low, spec.high, shape, generator=generator, dtype=torch.int64).to(dtype)
