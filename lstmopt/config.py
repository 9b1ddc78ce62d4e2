"""Batch configs: YAML in, validated jobs out, every error naming the file, line and field.

    version: 1                      # optional
    pythonpath: [../examples]       # importable for factories (relative to this file)
    defaults:                       # any job key but name/input/output
      format: torchscript
      input_shape: [8, 100, 40]
    jobs:
      - name: encoder               # optional, defaults to the output's path
        input: models/encoder.pt    # relative to this file; ${VAR} and ${VAR:-default} are expanded
        output: ${OUT_DIR}/encoder.ts.pt
        factory: encoders:build
        min_speedup: 1.1

Job keys: name, input, output, format, dtype, factory, factory_kwargs, trust, state_dict_key, strip_prefix,
example_inputs, input_shape, atol, rtol, benchmark, autotune, approx, min_speedup, require_lstm. Unknown keys are errors. Validation (pydantic) runs on
the whole file before any job starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

from .choices import DTYPES, FORMATS
from .errors import UsageError
from .pipeline import OptimizeOptions

__all__ = ["BatchConfig", "BatchJob", "load_config"]

Positive = Annotated[int, Field(gt=0, strict=True)]
NonNegative = Annotated[float, Field(ge=0)]
FormatName = Literal[FORMATS]  # type: ignore[valid-type]
DtypeName = Literal[DTYPES]  # type: ignore[valid-type]


class _Settings(BaseModel):
    """The keys a job may set, and that ``defaults`` may set for every job."""

    model_config = ConfigDict(extra="forbid")

    format: Optional[FormatName] = None
    dtype: Optional[DtypeName] = None
    factory: Optional[StrictStr] = None
    factory_kwargs: Optional[dict[StrictStr, Any]] = None
    trust: Optional[StrictBool] = None
    state_dict_key: Optional[StrictStr] = None
    strip_prefix: Optional[StrictStr] = None
    example_inputs: Optional[StrictStr] = None
    input_shape: Optional[Annotated[list[Positive], Field(min_length=3, max_length=3)]] = None
    atol: Optional[NonNegative] = None
    rtol: Optional[NonNegative] = None
    benchmark: Optional[StrictBool] = None
    autotune: Optional[StrictBool] = None
    approx: Optional[StrictBool] = None
    min_speedup: Optional[Annotated[float, Field(gt=0)]] = None
    require_lstm: Optional[StrictBool] = None


class _Job(_Settings):
    name: Optional[StrictStr] = None
    input: StrictStr
    output: StrictStr

    @model_validator(mode="after")
    def _inputs(self) -> "_Job":
        if self.example_inputs is not None and self.input_shape is not None:
            raise ValueError("give either example_inputs or input_shape, not both")
        for wanted, key in ((self.min_speedup is not None, "min_speedup"), (self.autotune, "autotune")):
            if wanted and self.example_inputs is None and self.input_shape is None:
                raise ValueError(f"{key} needs inputs to time: set example_inputs or input_shape")
        if self.approx and not self.autotune:
            raise ValueError("approx only widens what autotune may choose: set autotune: true")
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    pythonpath: list[StrictStr] = []
    defaults: dict[StrictStr, Any] = {}
    jobs: Annotated[list[dict[StrictStr, Any]], Field(min_length=1)]


@dataclass(frozen=True)
class BatchJob:
    name: str
    options: OptimizeOptions
    line: int  # where the job starts in the config


@dataclass(frozen=True)
class BatchConfig:
    path: Path
    pythonpath: tuple[Path, ...]
    jobs: tuple[BatchJob, ...]


class _Problems:
    """Collects errors with their line numbers, found through the YAML node tree."""

    def __init__(self, path: Path, root: Optional[yaml.Node]):
        self.path, self.root, self.items = path, root, []

    def line(self, loc: tuple) -> int:
        node, line = self.root, 1
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if match is None:
                    break
                line = match[0].start_mark.line + 1
                node = match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def add(self, loc: tuple, message: str) -> None:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<file>"
        self.items.append((self.line(loc), field, message))

    def add_validation(self, prefix: tuple, error: ValidationError) -> None:
        for e in error.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message = "unknown key (check its spelling)"
            elif e["type"] == "literal_error":
                message = f"{message}, got {e['input']!r}"
            self.add(prefix + loc, message)

    def raise_if_any(self) -> None:
        if self.items:
            self.items.sort()
            first = "; ".join(f"{self.path}:{line}: {field}: {message}" for line, field, message in self.items[:1])
            more = "" if len(self.items) == 1 else f" (and {len(self.items) - 1} more: " + ", ".join(
                f"line {line} {field}" for line, field, _ in self.items[1:6]) + (", ..." if len(self.items) > 6
                                                                                 else "") + ")"
            raise UsageError(first + more)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, loc: tuple, problems: _Problems) -> Any:
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problems.add(loc, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            return match.group(0)
        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, loc + (k,), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, loc + (i,), problems) for i, v in enumerate(value)]
    return value


def load_config(path: os.PathLike | str) -> BatchConfig:
    """Read and validate a batch config; a UsageError names the first problem's file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where}: not valid YAML: {problem}") from exc
    problems = _Problems(path, root)
    if not isinstance(data, dict):
        raise UsageError(f"{path}:1: the config must be a mapping with a 'jobs' list, got "
                         f"{'an empty file' if data is None else type(data).__name__}")
    data = _expand(data, (), problems)
    try:
        config = _File.model_validate(data)
    except ValidationError as exc:
        problems.add_validation((), exc)
        problems.raise_if_any()
        raise AssertionError("unreachable")
    known = len(problems.items)
    for key in ("name", "input", "output"):
        if key in config.defaults:
            problems.add(("defaults", key), f"'{key}' belongs in each job, not in defaults")
    try:
        _Settings.model_validate({k: v for k, v in config.defaults.items() if k not in ("name", "input", "output")})
    except ValidationError as exc:
        problems.add_validation(("defaults",), exc)
    if len(problems.items) > known:
        problems.raise_if_any()  # a bad default would be reported again for every job
    defaults = config.defaults

    base = path.parent.resolve()

    def resolve(value: Optional[str]) -> Optional[Path]:
        if value is None:
            return None
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else base / p))

    jobs, names, outputs = [], {}, {}
    for i, raw in enumerate(config.jobs):
        try:
            job = _Job.model_validate({**defaults, **raw})
        except ValidationError as exc:
            problems.add_validation(("jobs", i), exc)
            continue
        output = resolve(job.output)
        name = job.name or os.path.relpath(output, base)
        if output in outputs:
            problems.add(("jobs", i, "output"), f"{job.output} is also the output of jobs[{outputs[output]}]")
        elif name in names:
            problems.add(("jobs", i, "name"), f"job name {name!r} is already used by jobs[{names[name]}]")
        if output == resolve(job.input):
            problems.add(("jobs", i, "output"), "the output is the input file; lstmopt never modifies its input")
        names.setdefault(name, i)
        outputs.setdefault(output, i)
        settings = job.model_dump(exclude_none=True, exclude={"name", "input", "output"})
        if "input_shape" in settings:
            settings["input_shape"] = tuple(settings["input_shape"])
        if "example_inputs" in settings:
            settings["example_inputs"] = resolve(settings["example_inputs"])
        settings["factory_kwargs"] = settings.get("factory_kwargs") or {}
        jobs.append(BatchJob(name, OptimizeOptions(input=resolve(job.input), output=output, **settings),
                             problems.line(("jobs", i))))
    problems.raise_if_any()
    return BatchConfig(path=path, pythonpath=tuple(resolve(p) for p in config.pythonpath), jobs=tuple(jobs))
