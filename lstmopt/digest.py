"""The SHA-256 of a file, read in blocks: inputs in reports, user code in batch skips, the native library's
content check. Nothing else here, so every layer can use it."""

import hashlib
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
