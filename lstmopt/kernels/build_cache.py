"""Where a first-use build of the native library lives (lstmopt run from a source tree that was never
installed): a private cache, whose files are loaded only if they are the very files lstmopt compiled.

Loading a shared library runs its constructors, so a cache another user (or a forged artifact that
writes files) could plant a file in is code execution. A cached library is loaded only when

- the cache directory and the library's directory are owned by this user, are real directories (not
  symlinks) and are not writable by group or others, and every directory above them is owned by root or
  this user and writable by nobody else unless sticky (``/tmp``);
- the library is a regular file owned by this user, and its SHA-256 is the one recorded in
  ``manifest.json`` when lstmopt compiled it.

A library that fails the content check (truncated, corrupt, replaced) is rebuilt; an insecure directory
is refused with one line (``InsecureCacheError``), since rebuilding there would be as unsafe. A build runs
in a fresh temporary directory and is renamed into place complete; concurrent builders queue on an
``flock``, which a killed build releases with its process (no stale lock can block anyone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from lstmopt.digest import sha256_file

__all__ = ["InsecureCacheError", "LOCK_TIMEOUT_S", "trusted_library"]

MANIFEST = "manifest.json"
LOCK_TIMEOUT_S = 900.0  # a build takes about 30 s; a holder alive this long is stuck, not building


class InsecureCacheError(RuntimeError):
    """The cache could hold a file someone else put there: lstmopt neither loads nor builds there."""


def _check_owned_private(path: Path, what: str) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise InsecureCacheError(f"{what} {path} is a symbolic link")
    if info.st_uid != os.getuid():
        raise InsecureCacheError(f"{what} {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o022:
        raise InsecureCacheError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})")


def _check_ancestors(path: Path) -> None:
    """Nobody but root and this user can rename or replace anything on the way to ``path``."""
    trusted = {0, os.getuid()}
    walked = Path(path.anchor)
    for part in path.parts[1:]:  # the path as given: a symlink on the way must be trusted too
        walked = walked / part
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(walked)
            if stat.S_ISLNK(info.st_mode) and info.st_uid not in trusted:
                raise InsecureCacheError(f"the cache path goes through {walked}, a symbolic link of another user")
    for parent in reversed(Path(os.path.realpath(path)).parents):
        try:
            info = os.stat(parent)
        except FileNotFoundError:  # made by mkdir next, inside a parent that passed this check
            break
        if info.st_uid not in trusted:
            raise InsecureCacheError(f"the cache is inside {parent}, which belongs to another user (uid {info.st_uid})")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise InsecureCacheError(f"the cache is inside {parent}, which other users can write to")


def private_dir(path: Path, what: str) -> None:
    """Make ``path`` a directory only this user can write, on a path nobody else can replace (else
    ``InsecureCacheError``)."""
    _check_ancestors(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_ancestors(path)
    _check_owned_private(path, what)


def _verified(library: Path) -> bool:
    """``library`` is the file lstmopt compiled: owned, regular, and its hash matches the manifest."""
    manifest = library.parent / MANIFEST
    try:
        info = os.lstat(library)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            return False
        if os.lstat(manifest).st_uid != os.getuid():
            return False
        with open(manifest, encoding="utf-8") as f:
            recorded = json.loads(f.read(4096))
        return isinstance(recorded, dict) and recorded.get("sha256") == sha256_file(library)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _build_lock(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {path} for over {timeout:.0f} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def trusted_library(root: Path, name: str, build, *, lock_timeout: float = LOCK_TIMEOUT_S) -> Path:
    """The path of ``root/name/name.so``, verified as described above; built with ``build(path)`` (which
    writes the library to ``path``) when missing or failing the content check."""
    private_dir(root, "the cache directory")
    directory = root / name
    library = directory / f"{name}.so"
    if directory.exists():
        _check_owned_private(directory, "the cache directory")
        if _verified(library):
            return library
    with _build_lock(root / f".{name}.lock", lock_timeout):
        private_dir(directory, "the cache directory")
        if _verified(library):  # another process built it while this one waited
            return library
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
        try:
            built = scratch / library.name
            build(built)
            digest = sha256_file(built)
            os.chmod(built, 0o755)
            os.replace(built, library)
            (scratch / MANIFEST).write_text(json.dumps({"sha256": digest, "name": name}), encoding="utf-8")
            os.replace(scratch / MANIFEST, directory / MANIFEST)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if not _verified(library):
        raise InsecureCacheError(f"{library} changed while it was being installed")
    return library
