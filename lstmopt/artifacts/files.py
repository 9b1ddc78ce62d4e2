"""Safe file handling shared by every writer: checks before work, atomic replacement, input hashes.

- ``check_paths`` runs before any work: every path a command writes is checked against every path it
  reads and against the others, and its directory must exist and take a new file.
- ``atomic_path`` writes beside the output and renames over it once complete. The temporary file is
  held under an advisory lock (``flock``) while its run lives, so ``remove_stale_temp_files`` deletes only
  what a killed run left, never a concurrent run's file. ``private_temp_dir`` does the same for the
  directories under ``$TMPDIR``.
- ``write_bytes`` writes with Python's own I/O, so a full disk is an ``OSError`` that ``atomic_path`` turns
  into a one-line ``UsageError``, never a crash inside a C++ writer.

Nothing here imports torch, so the CLI can write reports without paying for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Tuple

from lstmopt.digest import sha256_file
from lstmopt.errors import UsageError

__all__ = ["atomic_path", "atomic_write_text", "check_output_path", "check_paths", "private_temp_dir",
           "output_lock", "remove_stale_temp_files", "sha256_file", "stale_temp_files", "write_bytes", "TEMP_MARK"]

TEMP_MARK = ".lstmopt-tmp-"

# A temporary file or directory younger than this is never taken for a leftover, locked or not: it may
# belong to a run that created it a moment ago and has not locked it yet.
STALE_AFTER_S = 10.0



def current_umask() -> int:
    """The process's umask, read without changing it: ``os.umask`` can only be read by setting it, and a file
    another thread creates meanwhile would get the mode set (0666 for a umask of 0). Linux reports it in
    /proc/self/status; elsewhere, a file created now shows it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="lstmopt-umask-") as directory:  # a file's mode is 0o666 & ~umask
        probe = os.path.join(directory, "probe")
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
        return 0o666 & ~os.stat(probe).st_mode & 0o777


def check_output_path(output: Path, *, force: bool, inputs: Tuple[Path, ...] = ()) -> Path:
    """Fail early (before any work) if ``output`` cannot or must not be written."""
    output = Path(output)
    for source in inputs:
        if source.exists() and output.exists() and os.path.samefile(source, output):
            raise UsageError(f"the output {output} is the input file; lstmopt never modifies its input")
    if output.exists() and not output.is_dir() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    check_writable(output)
    return output


def check_paths(reads: Mapping[str, Optional[Path]], writes: Mapping[str, Optional[Path]], *,
                create_dirs: bool = False) -> None:
    """Before any work: no path written is a path read or another path written (through links too),
    and every path written can be created (``create_dirs``: in directories yet to be made, as a batch
    config's tree is). Keys name the paths in messages ("the report", "the input")."""
    reads = {what: Path(p) for what, p in reads.items() if p is not None}
    writes = {what: Path(p) for what, p in writes.items() if p is not None}
    seen: list[tuple[str, Path]] = []
    for what, path in writes.items():
        for other, source in reads.items():
            if _same_file(path, source):
                raise UsageError(f"{what} {path} is {other} {source}; lstmopt never writes a file it reads")
        for other, earlier in seen:
            if _same_file(path, earlier):
                raise UsageError(f"{what} {path} and {other} {earlier} are the same file; give each its own path")
        seen.append((what, path))
        check_writable(path, what, create_dirs=create_dirs)


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_writable(path: Path, what: str = "", *, create_dirs: bool = False) -> None:
    """``path`` can be written: not a directory, in an existing directory that takes a new file (or, with
    ``create_dirs``, below the nearest existing one, which must take a new directory)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise UsageError(f"cannot write {label}: it is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    while create_dirs and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {label}: {parent} does not exist or is not a directory")
    try:  # os.access says yes to root on a read-only file system: try it
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}probe-", dir=parent)
    except OSError as exc:
        raise UsageError(f"cannot write {label}: directory {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(output: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``output``; on success it replaces ``output``, otherwise it vanishes.
    The temporary file stays locked (see ``remove_stale_temp_files``) until it is renamed or removed."""
    output = Path(output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}{TEMP_MARK}", dir=output.parent or ".")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Path(tmp)
        # mkstemp creates files readable by the owner only; outputs get the permissions open() would give them
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, output)
    except BaseException as exc:  # including KeyboardInterrupt: never leave a partial file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, FileNotFoundError) and not os.path.exists(tmp):
            raise UsageError(f"cannot write {output}: lstmopt's temporary file {tmp} was removed while the run "
                             "was using it (by another process?); nothing was written, run again") from exc
        if isinstance(exc, OSError):  # disk full, permissions, ...
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
        raise
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with Python's own I/O, so a full disk is an ``OSError`` (saying how much was
    needed) that ``atomic_path`` turns into a one-line error, never a crash inside a C++ writer."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} ({len(data) / 1e6:.1f} MB needed)") from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (a report) atomically."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _unlocked_and_old(path: Path, lock_file: Path) -> bool:
    """Nobody holds ``lock_file``'s lock and ``path`` is older than ``STALE_AFTER_S``: a killed run's."""
    try:
        if time.time() - path.lstat().st_mtime < STALE_AFTER_S:
            return False
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def stale_temp_files(output: Path) -> list[Path]:
    """Temporary files that a run writing ``output`` left behind because it was killed (SIGKILL cannot
    be cleaned up after): unlocked and not new. They are never the output itself, nor a live run's file."""
    output = Path(output)
    return sorted(p for p in output.parent.glob(f".{output.name}{TEMP_MARK}*")
                  if p.is_file() and not p.is_symlink() and _unlocked_and_old(p, p))


def remove_stale_temp_files(output: Path) -> None:
    for leftover in stale_temp_files(output):
        with contextlib.suppress(OSError):
            leftover.unlink()


@contextlib.contextmanager
def private_temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory under ``$TMPDIR``, removed on the way out. Its ``.lock`` is held while the run
    lives, so directories of this prefix that killed runs left behind are removed here, and only those."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if (old.is_dir() and not old.is_symlink() and old.stat().st_uid == os.getuid()
                    and _unlocked_and_old(old, old / ".lock")):
                shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    fd = os.open(path / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def output_lock(output: Path, *, on_wait=None) -> Iterator[None]:
    """Hold the lock of the run writing ``output`` (a hidden ``.NAME.lstmopt-lock`` beside it, removed on
    the way out); ``on_wait()`` is called once if another run holds it and this one has to wait."""
    output = Path(output)
    path = output.parent / f".{output.name}.lstmopt-lock"
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
                on_wait = None
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the run before this one removed its lock file: a lock on that file guards nothing
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
