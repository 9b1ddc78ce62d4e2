"""What a pickle holds, read without unpickling it: the globals it names and the kind of its root object.

``torch.serialization.get_unsafe_globals_in_checkpoint`` reads only the protocol ``torch.save`` uses by
default (2): on a file saved with ``pickle_protocol=4`` or 5 (flair's ``save()``, for one) it raises, and a
caller that took that as "no globals" would misjudge the file. Here the opcodes are read with
``pickletools`` for any protocol, tracking the strings that ``STACK_GLOBAL`` (protocols 4 and 5) takes from
the stack and the memo, as scanners of untrusted pickles do.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["PickleContents", "read_contents", "scan"]

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}
_ROOTS = {"EMPTY_DICT": "dict", "DICT": "dict", "EMPTY_LIST": "list", "LIST": "list", "EMPTY_TUPLE": "tuple",
          "TUPLE": "tuple", "TUPLE1": "tuple", "TUPLE2": "tuple", "TUPLE3": "tuple",
          **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"), "int")}
# Opcodes that come before the root object is made (besides a class's name, in protocols 4 and 5).
_PREAMBLE = {"PROTO", "FRAME", "MARK"}
_DICT_CLASSES = {"collections.OrderedDict", "builtins.dict"}


@dataclass(frozen=True)
class PickleContents:
    """``globals_``: every ``module.name`` the pickle imports, in order of first use; ``root``: what its
    top-level object is ("dict", "list", "tuple", the ``module.name`` of its class, or "" if unknown)."""

    globals_: tuple[str, ...]
    root: str
    protocol: int = 2

    def unsafe_globals(self) -> list[str]:
        """The globals torch's weights-only loader refuses (those it does not allow by default or by
        ``torch.serialization.add_safe_globals``)."""
        from torch import _weights_only_unpickler as weights_only

        allowed = set(weights_only._get_allowed_globals()) | set(weights_only._get_user_allowed_globals())
        return [name for name in self.globals_ if name.replace("__builtin__.", "builtins.", 1) not in allowed]

    @property
    def weights_only_readable(self) -> bool:
        """Whether torch's weights-only loader can read it at all: it knows protocol 2's opcodes only (and
        refuses FRAME, which every protocol 4 or 5 pickle holds)."""
        return self.protocol <= 3 and not self.unsafe_globals()

    @property
    def root_is_mapping(self) -> bool:
        return self.root == "dict" or self.root in _DICT_CLASSES

    @property
    def root_is_container(self) -> bool:
        """A dict, list or tuple (a state dict, a checkpoint, a list of examples), not an object of a class."""
        return self.root_is_mapping or self.root in ("list", "tuple")

    def describe(self) -> str:
        """What the file holds, in words: "a dict", "a flair.models.LanguageModel object", ..."""
        if self.root_is_mapping:
            return "a dict"
        if self.root in ("list", "tuple"):
            return f"a {self.root}"
        return f"a {self.root} object" if self.root else "a pickled object"


def scan(data: bytes) -> PickleContents:
    """The globals and root kind of one pickle (raises ``ValueError`` on bytes that are not a pickle)."""
    return _scan(io.BytesIO(data))


def _scan(stream) -> PickleContents:
    """The pickle that starts at ``stream``'s position, which is left after its STOP."""
    found: list[str] = []
    stack: list = []  # the strings pushed so far (what STACK_GLOBAL reads), others as None
    memo: dict = {}
    root, protocol = "", 2
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name == "PROTO":
                protocol = arg
            if not root and name not in _PREAMBLE | _STRINGS | _MEMO_PUT | {"MEMOIZE"}:
                root = _ROOTS.get(name, "")
                if name == "GLOBAL":
                    root = _dotted(*str(arg).split(" ", 1))
                elif name == "STACK_GLOBAL":
                    root = _dotted(*_last_two(stack))
                root = root or "?"
            if name in _STRINGS:
                stack.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in _MEMO_PUT:
                memo[arg] = stack[-1] if stack else None
            elif name in _MEMO_GET:
                stack.append(memo.get(arg))
            elif name == "GLOBAL":
                _add(found, _dotted(*str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                _add(found, _dotted(*_last_two(stack)))
                stack.append(None)
            elif name != "MARK":
                stack.append(None)
    except Exception as exc:  # pickletools raises ValueError for garbage, others for truncation
        raise ValueError(f"not a readable pickle ({exc})") from exc
    return PickleContents(tuple(found), "" if root == "?" else root, protocol)


def _last_two(stack: list) -> tuple[str, str]:
    module, name = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
    return (module if isinstance(module, str) else "?", name if isinstance(name, str) else "?")


def _dotted(module: str, name: str = "?") -> str:
    return f"{module}.{name}"


def _add(found: list[str], name: str) -> None:
    if name not in found:
        found.append(name)


# torch.save's legacy (non-zip) format: four pickles (magic number, protocol, system info, the object), a
# fifth with the storage keys, then raw storage bytes.
_LEGACY_OBJECT = 3
_LEGACY_PICKLES = 5


def read_contents(path: Path) -> Optional[PickleContents]:
    """The contents of a ``torch.save`` file (its ``data.pkl`` record, or a legacy file's object pickle) or
    of a plain pickle; None when it cannot be read as one."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                return None if name is None else scan(archive.read(name))
        with open(path, "rb") as stream:
            pickles = [_scan(stream)]
            while len(pickles) < _LEGACY_PICKLES and pickles[0].root == "int":
                pickles.append(_scan(stream))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if len(pickles) == 1:
        return pickles[0]
    names = tuple(dict.fromkeys(name for p in pickles for name in p.globals_))
    return PickleContents(names, pickles[_LEGACY_OBJECT].root, pickles[_LEGACY_OBJECT].protocol)
