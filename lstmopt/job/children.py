"""How lstmopt starts its own Python processes (the verification child, batch workers): isolated, and
never outliving lstmopt.

``python -I`` ignores ``PYTHONPATH`` and the ``PYTHON*`` variables, leaves the script's directory and the
working directory off ``sys.path`` and skips the user site: a ``sitecustomize.py``, ``torch/`` or
``json.py`` in the working directory cannot run. Whatever user code a child needs it adds itself, after
the installed packages.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

__all__ = ["die_with_parent", "in_installation", "isolated_python", "preexec"]


def isolated_python(*args: str) -> list[str]:
    """The command line of an isolated interpreter running ``args`` (a script path or ``-m module``)."""
    return [sys.executable, "-I", "-W", "ignore", *args]


def die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when its parent dies (``PR_SET_PDEATHSIG``)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def preexec() -> Optional[Callable[[], None]]:
    """``preexec_fn`` for ``subprocess``: ``die_with_parent`` where the kernel offers it (Linux)."""
    return die_with_parent if sys.platform.startswith("linux") else None


def in_installation(path: str) -> bool:
    """Whether ``path`` lies inside this Python installation (its prefixes: the standard library and the
    installed packages), as opposed to the user's own code."""
    real = os.path.realpath(path)
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return any(real == root or real.startswith(root + os.sep) for root in roots)
