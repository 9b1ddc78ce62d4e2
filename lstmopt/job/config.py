"""Batch configs: YAML in, validated jobs out, every error naming the file, line and field.

    version: 1                      # optional
    pythonpath: [../examples]       # importable for factories (relative to this file)
    defaults:                       # any job key but name/input/output
      format: auto
      input_shape: [8, 100, 40]
    jobs:
      - name: encoder               # optional, defaults to the output's path
        input: models/encoder.pt    # relative to this file; ${VAR} and ${VAR:-default} are expanded
        output: ${OUT_DIR}/encoder.ts.pt
        factory: encoders:build
        min_speedup: 1.1

A config is code: its factories are imported and called, and ``pythonpath`` decides where from; run
only configs you trust. ``${VAR}`` values are kept out of reports and summaries (written back as
``${VAR}``) unless ``lstmopt batch --show-variables``.

Job keys: name, input, output, format, dtype, factory, factory_kwargs, trust, state_dict_key, strip_prefix,
example_inputs (a file, or a function ``package.module:function``), input_shape, inputs (``--input`` specs, one
per argument), atol, rtol, benchmark, autotune, approx, min_speedup, require_lstm, seed. Unknown keys are errors. Validation (pydantic) runs on
the whole file before any job starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from lstmopt.choices import DTYPES, FORMAT_CHOICES, names_a_function
from lstmopt.digest import sha256_file
from lstmopt.errors import UsageError
from lstmopt.job.pipeline import OptimizeOptions

__all__ = ["BatchConfig", "BatchJob", "load_config"]

Positive = Annotated[int, Field(gt=0, strict=True)]
NonNegative = Annotated[float, Field(ge=0)]
FormatName = Literal[FORMAT_CHOICES]  # type: ignore[valid-type]
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
    inputs: Optional[Annotated[list[StrictStr], Field(min_length=1)]] = None
    atol: Optional[NonNegative] = None
    rtol: Optional[NonNegative] = None
    benchmark: Optional[StrictBool] = None
    autotune: Optional[StrictBool] = None
    approx: Optional[StrictBool] = None
    min_speedup: Optional[Annotated[float, Field(gt=0)]] = None
    require_lstm: Optional[StrictBool] = None
    seed: Optional[StrictInt] = None


class _Job(_Settings):
    name: Optional[StrictStr] = None
    input: StrictStr
    output: StrictStr

    @model_validator(mode="after")
    def _inputs(self) -> "_Job":
        given = [key for key in ("example_inputs", "input_shape", "inputs") if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of example_inputs, input_shape and inputs, not {' and '.join(given)}")
        for wanted, key in ((self.min_speedup is not None, "min_speedup"), (self.autotune, "autotune")):
            if wanted and not given:
                raise ValueError(f"{key} needs inputs to time: set example_inputs, input_shape or inputs")
        if self.inputs is not None:
            from lstmopt.job.input_specs import parse_inputs

            try:
                parse_inputs(self.inputs)
            except UsageError as exc:
                raise ValueError(str(exc).replace("--input ", "", 1)) from None
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
    variables: Mapping[str, str] = field(default_factory=dict)  # ${VAR}s expanded: kept out of reports
    sha256: str = ""  # of the config file: shard reports of one config merge, others do not
    shard: Optional[dict] = None  # {"index": I, "count": N, "jobs": config indices of the jobs kept}

    def sharded(self, index: int, count: int) -> "BatchConfig":
        """The ``index``-th of ``count`` slices (1-based): the jobs whose position in the config is
        ``index - 1`` modulo ``count``. Deterministic for a given config, and balanced to within one job.

        Example:
            >>> load_config("ci.yaml").sharded(2, 3).jobs  # jobs 1, 4, 7, ... of the config (0-based)
        """
        if not 1 <= index <= count:
            raise UsageError(f"--shard I/N needs 1 <= I <= N, got {index}/{count}")
        kept = [i for i in range(len(self.jobs)) if i % count == index - 1]
        return replace(self, jobs=tuple(self.jobs[i] for i in kept),
                       shard={"index": index, "count": count, "jobs": kept, "config_jobs": len(self.jobs)})

    def redact(self, data: Any) -> Any:
        """``data`` (a report) with every expanded variable's value written back as ``${NAME}``. Values under
        4 characters are left alone: replacing them would garble numbers and words, and they hide nothing."""
        values = sorted(((v, k) for k, v in self.variables.items() if len(v) >= 4), key=lambda vk: -len(vk[0]))
        if not values:
            return data

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                for secret, name in values:
                    value = value.replace(secret, "${" + name + "}")
                return value
            if isinstance(value, dict):
                return {walk(k): walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            return value

        return walk(data)


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

# A config is a page of YAML: these bound what a hostile or broken one can cost (an alias bomb of 1 kB
# expands to billions of values; deep nesting exhausts the parser's recursion).
MAX_CONFIG_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_DEPTH = 50


class _Budget:
    def __init__(self, path: Path):
        self.path, self.left = path, MAX_VALUES
        self.variables: dict[str, str] = {}  # the environment variables expanded, by name

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise UsageError(f"{self.path}: the config expands to over {MAX_VALUES:,} values (YAML aliases "
                             "repeating one another?); write the jobs out")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # ? [a, b] : 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); a second one would "
                    "silently replace the first", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _check_depth(text: str, path: Path) -> None:
    """Nesting deeper than MAX_DEPTH, found by the scanner (iterative, unlike the parser)."""
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
               yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, opening):
            depth += 1
            if depth > MAX_DEPTH:
                raise UsageError(f"{path}:{token.start_mark.line + 1}: nested over {MAX_DEPTH} levels deep; "
                                 "a batch config needs a few")
        elif isinstance(token, closing):
            depth -= 1


def _expand(value: Any, loc: tuple, problems: _Problems, budget: _Budget) -> Any:
    budget.spend()
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                budget.variables[name] = os.environ[name]
                return os.environ[name]
            if default is not None:
                return default
            problems.add(loc, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            return match.group(0)
        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, loc + (k,), problems, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, loc + (i,), problems, budget) for i, v in enumerate(value)]
    return value


def _where(exc: yaml.YAMLError, text: str, path: Path) -> str:
    """``file:line:column`` of a YAML error: the parser's mark, or a reader error's position (a NUL byte)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}:{mark.column + 1}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return f"{path}:{line}:{exc.position - (text.rfind(chr(10), 0, exc.position) + 1) + 1}"
    return str(path)


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character
        return f"character {character!r} is not allowed in YAML ({exc.reason})"
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def load_config(path: os.PathLike | str) -> BatchConfig:
    """Read and validate a batch config; a UsageError names the first problem's file, line and field."""
    path = Path(path)
    text = _read_text(path)
    try:
        _check_depth(text, path)
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UsageError(f"{_where(exc, text, path)}: not valid YAML: {_problem(exc)}") from exc
    problems = _Problems(path, root)
    if not isinstance(data, dict):
        raise UsageError(f"{path}:1: the config must be a mapping with a 'jobs' list, got "
                         f"{'an empty file' if data is None else type(data).__name__}")
    budget = _Budget(path)
    data = _expand(data, (), problems, budget)
    try:
        config = _File.model_validate(data)
    except ValidationError as exc:
        problems.add_validation((), exc)
        problems.raise_if_any()
        raise AssertionError("unreachable")
    _check_defaults(config.defaults, problems)
    base = path.parent.resolve()
    jobs = _jobs(config, problems, base)
    problems.raise_if_any()
    return BatchConfig(path=path, pythonpath=tuple(_resolved(p, base) for p in config.pythonpath), jobs=tuple(jobs),
                       variables=budget.variables, sha256=sha256_file(path))


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MB; a batch config is a page of YAML")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the config as UTF-8") from None


def _check_defaults(defaults: dict, problems: "_Problems") -> None:
    known = len(problems.items)
    for key in ("name", "input", "output"):
        if key in defaults:
            problems.add(("defaults", key), f"'{key}' belongs in each job, not in defaults")
    try:
        _Settings.model_validate({k: v for k, v in defaults.items() if k not in ("name", "input", "output")})
    except ValidationError as exc:
        problems.add_validation(("defaults",), exc)
    if len(problems.items) > known:
        problems.raise_if_any()  # a bad default would be reported again for every job


def _resolved(value: Optional[str], base: Path) -> Optional[Path]:
    """A path of the config, relative to its directory."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _jobs(config: "_File", problems: "_Problems", base: Path) -> list[BatchJob]:
    """Each job with the defaults under it, its paths resolved; names and outputs unique, no output on its input."""
    jobs, names, outputs = [], {}, {}
    for i, raw in enumerate(config.jobs):
        try:
            job = _Job.model_validate({**config.defaults, **raw})
        except ValidationError as exc:
            problems.add_validation(("jobs", i), exc)
            continue
        output = _resolved(job.output, base)
        name = job.name or os.path.relpath(output, base)
        if output in outputs:
            problems.add(("jobs", i, "output"), f"{job.output} is also the output of jobs[{outputs[output]}]")
        elif name in names:
            problems.add(("jobs", i, "name"), f"job name {name!r} is already used by jobs[{names[name]}]")
        if output == _resolved(job.input, base):
            problems.add(("jobs", i, "output"), "the output is the input file; lstmopt never modifies its input")
        names.setdefault(name, i)
        outputs.setdefault(output, i)
        settings = job.model_dump(exclude_none=True, exclude={"name", "input", "output"})
        if "input_shape" in settings:
            settings["input_shape"] = tuple(settings["input_shape"])
        if "example_inputs" in settings and not (names_a_function(settings["example_inputs"])
                                                 and not _resolved(settings["example_inputs"], base).exists()):
            settings["example_inputs"] = _resolved(settings["example_inputs"], base)
        settings["factory_kwargs"] = settings.get("factory_kwargs") or {}
        jobs.append(BatchJob(name, OptimizeOptions(input=_resolved(job.input, base), output=output, **settings),
                             problems.line(("jobs", i))))
    return jobs
