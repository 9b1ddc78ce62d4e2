"""The options several commands share, and reading what they name (models, inputs, shapes)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from lstmopt.choices import DTYPES, FORMAT_CHOICES
from lstmopt.errors import UsageError
from lstmopt.cli.ui import UI

Format = Enum("Format", {f: f for f in FORMAT_CHOICES}, type=str)  # type: ignore[misc]
Dtype = Enum("Dtype", {d: d for d in DTYPES}, type=str)  # type: ignore[misc]

LOADING, CHECKS, OUTPUT = "Loading the model", "Verification and benchmark", "Output"

FactoryOpt = Annotated[Optional[str], typer.Option(
    "--factory", metavar="PKG.MOD:FN", rich_help_panel=LOADING,
    help="Callable that builds the model a state dict is loaded into (the current directory is importable).")]
FactoryKwargsOpt = Annotated[Optional[str], typer.Option(
    "--factory-kwargs", metavar="JSON", rich_help_panel=LOADING,
    help='Keyword arguments for --factory, as a JSON object, e.g. \'{"hidden": 256}\'.')]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", rich_help_panel=LOADING,
    help="Allow loading a pickled module. Unpickling runs code named by the file: only for files you trust.")]
StateDictKeyOpt = Annotated[Optional[str], typer.Option(
    "--state-dict-key", metavar="KEY", rich_help_panel=LOADING,
    help="Where the weights are in a training checkpoint (e.g. state_dict, model, ema; dots for nested keys), "
         "when lstmopt cannot tell: by default it takes the one mapping of tensors that fits the model.")]
StripPrefixOpt = Annotated[Optional[str], typer.Option(
    "--strip-prefix", metavar="PREFIX", rich_help_panel=LOADING,
    help="Remove this prefix from every key of the state dict (e.g. 'module.' from DDP); by default a prefix "
         "shared by every key is stripped when that makes the keys fit.")]
ExampleInputsOpt = Annotated[Optional[str], typer.Option(
    "--example-inputs", metavar="FILE|PKG.MOD:FN", rich_help_panel=CHECKS,
    help="torch.save'd list of examples, each a tuple of the model's forward arguments; or a function of yours "
         "that returns that list (for inputs that hold your own classes, such as a dataclass batch).")]
InputShapeOpt = Annotated[Optional[str], typer.Option(
    "--input-shape", metavar="B,T,F", rich_help_panel=CHECKS,
    help="For a model taking one (batch, time, features) tensor: random inputs at 2 batch sizes x 2 lengths.")]
InputOpt = Annotated[Optional[list[str]], typer.Option(
    "--input", metavar="SPEC", rich_help_panel=CHECKS,
    help="One forward argument, repeated in order: float32[B=8,T=100,40] (random), int64[B,T]:0..1000 (ids in "
         "[0, 1000)), lengths[B] (sequence lengths, longest first), (float32[1,B,64], float32[1,B,64]) (a "
         "tuple). B and T are varied like --input-shape's.")]
AtolOpt = Annotated[Optional[float], typer.Option(
    "--atol", min=0, rich_help_panel=CHECKS, help="Absolute tolerance [default: 0 for float32; bfloat16 and int8: "
                                                  "4x the largest error measured against float32].")]
RtolOpt = Annotated[Optional[float], typer.Option(
    "--rtol", min=0, rich_help_panel=CHECKS, help="Relative tolerance [default: 0].")]
DtypeOpt = Annotated[Dtype, typer.Option(
    "--dtype", help="LSTM compute dtype: float32 is bit-identical; bfloat16 is faster on large shapes where "
                    "the CPU has native bf16 (elsewhere: the native kernel on bf16 weights); int8 runs LSTMs (no "
                    "projection) on the native kernel with int8 weights. Both change numerics: each LSTM's "
                    "error against float32 is reported.")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT,
                                       help="Print the result as JSON on stdout (nothing else on stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUTPUT,
                                        help="Print nothing but errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", rich_help_panel=OUTPUT,
                                        help="Show tracebacks for errors.")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", metavar="N", rich_help_panel=CHECKS,
    help="Seed the random generators (torch, Python, NumPy) with N before each compared call, on both sides: "
         "for models that sample or keep dropout on in eval mode, which otherwise cannot be verified.")]


def parse_kwargs(text: Optional[str]) -> dict:
    """--factory-kwargs: a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--factory-kwargs is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    if not isinstance(value, dict):
        raise UsageError(f"--factory-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def parse_shape(text: Optional[str]):
    """--input-shape B,T,F, or None."""
    from lstmopt.job.samples import parse_shape as parse

    return parse(text) if text else None


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """--shard I/N, or None."""
    if text is None:
        return None
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit() or not 1 <= int(index) <= int(count):
        raise UsageError(f"--shard must be I/N with 1 <= I <= N (this machine runs slice I of N), got {text!r}")
    return int(index), int(count)


def example_inputs_file(example_inputs: Optional[str]) -> Optional[Path]:
    """The example inputs' file, or None where they come from a function (``package.module:function``)."""
    from lstmopt.choices import names_a_function

    return None if example_inputs is None or names_a_function(example_inputs) else Path(example_inputs)


def load_samples(example_inputs: Optional[str], input_shape: Optional[str], inputs: Optional[list[str]] = None) -> list:
    from lstmopt.job.samples import samples_for

    return samples_for(example_inputs, parse_shape(input_shape), inputs)


def load(ui: UI, input: Path, factory: Optional[str], factory_kwargs: Optional[str], trust: bool,
         state_dict_key: Optional[str] = None, strip_prefix: Optional[str] = None):
    """The model a command's options name (see ``lstmopt.artifacts.loading.load_model``)."""
    from lstmopt.artifacts.loading import load_model

    with ui.status(f"loading {input}"):
        loaded = load_model(input, factory=factory, factory_kwargs=parse_kwargs(factory_kwargs), trust=trust,
                            state_dict_key=state_dict_key, strip_prefix=strip_prefix)
    say_where_the_weights_were(ui, input, loaded.state_dict_key, loaded.stripped_prefix)
    return loaded


def say_where_the_weights_were(ui: UI, path, key: Optional[str], prefix: Optional[str]) -> None:
    if key or prefix:
        where = f"the {key!r} entry of {path}" if key else str(path)
        ui.show(f"weights: {where}" + (f", keys without the prefix {prefix!r}" if prefix else ""))
