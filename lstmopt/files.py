"""Safe file handling shared by every writer: checks before work, atomic replacement, input hashes.

Nothing here imports torch, so the CLI can write reports without paying for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Tuple

from .errors import UsageError

__all__ = ["atomic_path", "atomic_write_text", "check_output_path", "sha256_file", "stale_temp_files", "TEMP_MARK"]

TEMP_MARK = ".lstmopt-tmp-"

# mkstemp creates files readable by the owner only; outputs get the permissions open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(output: Path, *, force: bool, inputs: Tuple[Path, ...] = ()) -> Path:
    """Fail early (before any work) if ``output`` cannot or must not be written."""
    output = Path(output)
    for source in inputs:
        if source.exists() and output.exists() and os.path.samefile(source, output):
            raise UsageError(f"the output {output} is the input file; lstmopt never modifies its input")
    if output.is_dir():
        raise UsageError(f"the output {output} is a directory; give a file name")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {output}: directory {parent} is not writable")
    return output


@contextlib.contextmanager
def atomic_path(output: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``output``; on success it replaces ``output``, otherwise it vanishes."""
    output = Path(output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}{TEMP_MARK}", dir=output.parent or ".")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, output)
    except BaseException as exc:  # including KeyboardInterrupt: never leave a partial file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, permissions, ...
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (a report) atomically."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def stale_temp_files(output: Path) -> list[Path]:
    """Temporary files that a run writing ``output`` left behind because it was killed (SIGKILL cannot
    be cleaned up after); they are never the output itself, only clutter beside it."""
    output = Path(output)
    return sorted(p for p in output.parent.glob(f".{output.name}{TEMP_MARK}*") if p.is_file())
