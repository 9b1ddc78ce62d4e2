"""The user's model code, fingerprinted: which source files a model came from, and whether they changed.

A batch job whose output was made from the same input and options is skipped only if the code that built
the model is unchanged too (``lstmopt.job.batch.up_to_date``): the artifact's metadata records
``user_code(...)``, and ``code_changed`` compares it with the files as they are now.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["code_changed", "user_code"]


def user_code(imported_before: set, factory: Optional[str] = None) -> dict:
    """SHA-256 of each source file of the user's code the model came from: modules imported while loading
    it (a factory's module and what it imports, a pickled model's classes), and the factory's module
    itself, from outside the Python installation and lstmopt. A batch output made with other code is
    out of date (``code_changed``)."""
    from lstmopt.artifacts.files import sha256_file
    from lstmopt.job.children import in_installation

    own = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep  # the lstmopt package
    names = set(sys.modules) - imported_before
    if factory:
        module = factory.partition(":")[0]
        names |= {".".join(module.split(".")[:i + 1]) for i in range(module.count(".") + 1)}
    found = {}
    for name in names:
        file = _module_file(sys.modules.get(name))
        if not file:
            continue
        real = os.path.realpath(file)
        if in_installation(real) or real.startswith(own) or not os.path.isfile(real):
            continue
        found[real] = sha256_file(Path(real))
    return dict(sorted(found.items()))


def _module_file(module) -> Optional[str]:
    """A module's ``__file__`` read from its own namespace: lazy modules (speechbrain's, SciPy's, ...) import
    their target on attribute access, which can fail or run code; one that never loaded has no file."""
    try:
        file = vars(module).get("__file__")
    except TypeError:  # not a module: sys.modules may hold any object
        return None
    return file if isinstance(file, str) else None


def code_changed(recorded: dict) -> bool:
    """Whether any file ``user_code`` recorded is gone or holds other bytes now."""
    from lstmopt.artifacts.files import sha256_file

    for path, digest in recorded.items():
        try:
            if sha256_file(Path(path)) != digest:
                return True
        except OSError:
            return True
    return False
