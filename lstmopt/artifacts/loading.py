"""Loading saved models without running untrusted code.

Formats are recognised by content, not by file extension:

- a ``torch.save`` zip archive holding a state dict or a training checkpoint that contains one (loaded
  with ``weights_only=True``; see ``lstmopt.artifacts.checkpoints``), rebuilt by a user-named factory
  ``package.module:callable``;
- a ``.safetensors`` file (needs the ``safetensors`` package), rebuilt the same way;
- a ``torch.save`` archive (or legacy pickle) holding a whole module: unpickling runs code named by the
  file, so it is refused unless the caller trusts the file;
- a TorchScript archive: refused, since its modules are compiled code that cannot be swapped (and loading it
  runs the code it holds: ``artifact_format`` lets one in only with trust).

Every failure is a ``UsageError`` (or ``UntrustedPickleError``) with a one-line message.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from lstmopt.artifacts.checkpoints import find_state_dict
from lstmopt.artifacts.pickles import PickleContents, read_contents
from lstmopt.errors import UntrustedPickleError, UsageError, one_line
from lstmopt.artifacts.files import sha256_file

__all__ = ["LoadedModel", "artifact_format", "detect_format", "load_model", "load_factory"]

# What a user should provide when a file cannot be optimized as it is.
_PROVIDE = ("provide the original model: a state dict (torch.save(model.state_dict())) with --factory "
            "package.module:callable, or a pickled module (torch.save(model)) with --trust")


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # torch.nn.Module
    path: Path
    sha256: str
    format: str  # "state_dict", "safetensors" or "pickled_module"
    factory: Optional[str] = None
    factory_kwargs: Optional[Mapping[str, Any]] = None
    state_dict_key: Optional[str] = None  # where the weights were in a training checkpoint
    stripped_prefix: Optional[str] = None  # removed from every key (module., model., ...)


def detect_format(path: Path) -> str:
    """One of "torch_zip", "torchscript", "legacy_pickle", "safetensors"; UsageError for anything else."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a model file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise UsageError(f"{path} is empty")
    if head.startswith(b"PK"):
        return _zip_kind(path)
    if head.startswith(b"\x93NUMPY"):
        raise UsageError(f"{path} is a NumPy array file, not a PyTorch model; {_PROVIDE}")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "legacy_pickle"
    if len(head) >= 9 and head[8:9] == b"{" and _safetensors_header_ok(path, head):
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        raise UsageError(f"{path} looks like JSON text, not a PyTorch model; {_PROVIDE}")
    if _looks_like_text(head):
        raise UsageError(f"{path} is a text file, not a PyTorch model; {_PROVIDE}")
    raise UsageError(f"{path} is not a PyTorch file (unrecognised content); {_PROVIDE}")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 32 or b in (9, 10, 13) for b in head)


def _safetensors_header_ok(path: Path, head: bytes) -> bool:
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= path.stat().st_size - 8


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip() if path.stat().st_size < (64 << 20) else None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UsageError(f"{path} is a corrupt or truncated archive ({exc}); re-export the model") from exc
    if bad is not None:
        raise UsageError(f"{path} is corrupt: record {bad} fails its checksum; re-export the model")
    # torch.load hands any archive with a constants.pkl record to torch.jit.load, which runs its code.
    if any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names):
        return "torchscript"
    if any("/data/aotinductor/" in n for n in names):
        return "aoti"
    if any(n.endswith("/archive_format") for n in names):
        return "pt2"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch_zip"
    if names and all(n.endswith(".npy") for n in names):
        raise UsageError(f"{path} is a NumPy .npz archive, not a PyTorch model; {_PROVIDE}")
    raise UsageError(f"{path} is a zip archive but not a PyTorch model; {_PROVIDE}")


def load_factory(spec: str, what: str = "--factory"):
    """Resolve ``package.module:callable`` (the current directory is importable, as with ``python -m``);
    ``what`` names the option in errors."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} must look like package.module:callable, got {spec!r}")
    _importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"cannot import {module_name!r} for {what} ({exc}); run from the directory that contains it "
            "or add that directory to PYTHONPATH"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{module_name} has no attribute {attr!r} (from {what} {spec})")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} {spec} is not callable")
    return target


def _importable_cwd() -> None:
    """Make the user's model code in the current directory importable, after the installed packages: a
    ``torch/`` or ``json.py`` lying there must not shadow what lstmopt itself imports."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def _build(spec: str, kwargs: Optional[Mapping[str, Any]]):
    import torch

    factory = load_factory(spec)
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as exc:  # the user's code: report it, whatever it raised
        raise UsageError(f"--factory {spec}(**{json.dumps(dict(kwargs or {}))}) failed: "
                         f"{type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _read_checkpoint(path: Path, kind: str, trust: bool) -> Any:
    """The file's content: a state dict, or a training checkpoint holding one (see ``lstmopt.artifacts.checkpoints``).
    Tensors, dicts and lists only, unless ``trust`` (a checkpoint may also hold other Python objects, such
    as a LightningModule's hyperparameters or a package's vocabulary, which only unpickling can rebuild; and
    torch's weights-only loader cannot read pickle protocols 4 and 5 at all)."""
    import torch

    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise UsageError(f"{path} is a safetensors file; install safetensors to read it "
                             "(pip install safetensors)") from exc
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UsageError(f"{path} is a corrupt safetensors file ({one_line(exc)})") from exc
    contents = _contents(path)
    if not contents.weights_only_readable and not trust:
        raise _untrusted(path, contents)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=contents.weights_only_readable)
    except pickle.UnpicklingError as exc:
        raise _untrusted(path, contents) from exc
    except Exception as exc:
        raise UsageError(f"{path} is a corrupt or truncated PyTorch file ({one_line(exc)})") from exc
    if isinstance(checkpoint, torch.nn.Module):
        raise UsageError(f"{path} is a pickled module, not a state dict: drop --factory "
                         "(and pass --trust if you trust the file)")
    return checkpoint


def _contents(path: Path) -> PickleContents:
    """What the pickle in ``path`` holds, read without running it."""
    contents = read_contents(path)
    if contents is None:
        raise UsageError(f"{path} is a corrupt or truncated PyTorch file (its pickle cannot be read)")
    return contents


def _untrusted(path: Path, contents: PickleContents) -> UntrustedPickleError:
    """The refusal of a file that only unpickling can read, saying what it holds and why it is refused."""
    needs = contents.unsafe_globals()
    names = ", ".join(needs[:12]) + (f" and {len(needs) - 12} more" if len(needs) > 12 else "")
    if contents.root_is_container:
        what = f"{contents.describe()} with Python objects besides tensors ({names})" if needs else (
            f"{contents.describe()} saved with pickle protocol {contents.protocol}, which torch's weights-only "
            "loader cannot read")
        return UntrustedPickleError(
            f"{path} holds {what}: loading it runs code named by the file. Pass --trust (trust=True) only if "
            "you trust its source, or save the weights alone")
    needs_text = f"; it needs {names}" if names else ""
    return UntrustedPickleError(
        f"{path} is a pickled module ({contents.describe()}): loading it runs code named by the file{needs_text}. "
        "Pass --trust (trust=True) only if you trust its source, or provide a state dict with --factory")


def _load_pickled_module(path: Path, trust: bool, contents: PickleContents):
    import torch

    if not trust:
        raise _untrusted(path, contents)
    _importable_cwd()
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        missing = getattr(exc, "name", None) or one_line(exc)
        raise UsageError(
            f"{path} needs {missing!s}, which is not importable here ({one_line(exc)}); install the package "
            "that defines it, or run from its directory / add it to PYTHONPATH"
        ) from exc
    except Exception as exc:
        raise UsageError(f"{path} is a corrupt or truncated PyTorch file ({one_line(exc)})") from exc
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{path} holds a {type(model).__module__}.{type(model).__qualname__} object, not a "
                         f"torch.nn.Module; {_PROVIDE}")
    return model


def load_model(
    path: os.PathLike | str,
    *,
    factory: Optional[str] = None,
    factory_kwargs: Optional[Mapping[str, Any]] = None,
    trust: bool = False,
    state_dict_key: Optional[str] = None,
    strip_prefix: Optional[str] = None,
) -> LoadedModel:
    """Load the model saved at ``path`` (on CPU, in eval mode), never running code from the file unless
    ``trust=True``. With a state dict or a training checkpoint, ``factory`` builds the architecture the
    weights are loaded into; ``state_dict_key`` and ``strip_prefix`` settle where the weights are in the
    checkpoint and what prefix their keys carry, when ``lstmopt.artifacts.checkpoints`` cannot tell by itself.

    Example:
        >>> loaded = load_model("checkpoint.ckpt", factory="mymodels:build")  # weights only, no code runs
        >>> loaded.model, loaded.format, loaded.state_dict_key
    """
    path = Path(path)
    kind = detect_format(path)
    if kind == "torchscript":
        raise UsageError(f"{path} is a TorchScript archive: its modules are compiled code lstmopt cannot swap; "
                         f"{_PROVIDE}")
    if kind in ("pt2", "aoti"):
        what = "a torch.export program" if kind == "pt2" else "an AOTInductor package"
        raise UsageError(f"{path} is {what}: its graph holds no modules lstmopt can swap; {_PROVIDE}")
    digest = sha256_file(path)
    contents = None if kind == "safetensors" else _contents(path)
    if contents is not None and not contents.root_is_container:
        if factory:
            raise UsageError(f"{path} is a pickled module ({contents.describe()}), not a state dict: drop "
                             "--factory (and pass --trust if you trust the file)")
        model = _load_pickled_module(path, trust, contents)
        return LoadedModel(model.eval(), path, digest, "pickled_module")

    if not factory:
        if contents is not None and contents.unsafe_globals():
            raise UsageError(f"{path} holds {contents.describe()} with Python objects besides tensors (a training "
                             "checkpoint, or a package's own save file), not a module: pass --factory "
                             "package.module:callable that builds the model, whose weights lstmopt then finds "
                             "in it (with --trust to read it)")
        raise UsageError(f"{path} holds only weights (a state dict); pass --factory package.module:callable "
                         "that builds the model (and --factory-kwargs for its arguments)")
    checkpoint = _read_checkpoint(path, kind, trust)
    model = _build(factory, factory_kwargs)
    try:
        choice = find_state_dict(checkpoint, set(model.state_dict()), key=state_dict_key, prefix=strip_prefix)
    except UsageError as exc:
        raise UsageError(f"{path} does not fit the model built by {factory}: {exc}") from None
    _load_into(model, choice.state, path, factory)
    return LoadedModel(model.eval(), path, digest, "safetensors" if kind == "safetensors" else "state_dict",
                       factory, dict(factory_kwargs or {}), choice.key, choice.prefix)


def artifact_format(path: os.PathLike | str, *, trust: bool = False) -> str:
    """The format of an optimized model someone hands us, by content: "torchscript", "pickle", "pt2", "aoti".
    All are code (a TorchScript archive's methods, ``__setstate__`` included, run as ``torch.jit.load``
    reads it; ``torch.export.load`` unpickles a program's weights with ``weights_only=False``), so each is
    refused unless ``trust``. Metadata inside the file is not proof of origin: anyone can write it."""
    path = Path(path)
    kind = detect_format(path)
    if kind in ("pt2", "aoti"):
        if not trust:
            why = ("a torch.export program: loading it unpickles its weights with weights_only=False, which can "
                   "run code" if kind == "pt2" else "an AOTInductor package: loading it loads the shared library "
                   "it holds")
            raise UntrustedPickleError(f"{path} is {why}. Pass --trust (trust=True) only if you trust its source")
        return kind
    if kind == "torchscript":
        if not trust:
            raise UntrustedPickleError(
                f"{path} is a TorchScript archive: loading it runs the code it holds. "
                "Pass --trust (trust=True) only if you trust its source")
        return "torchscript"
    if kind == "safetensors":
        raise UsageError(f"{path} is a safetensors file (weights only), not a model lstmopt wrote")
    if not trust:
        raise _untrusted(path, _contents(path))
    return "pickle"


def _load_into(model, state: Mapping[str, Any], path: Path, factory: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the keys fit (find_state_dict saw to that); a shape may not
        detail = " ".join(str(exc).split("\n\t", 1)[-1].split())
        raise UsageError(f"{path} does not fit the model built by {factory}: {detail}") from exc
