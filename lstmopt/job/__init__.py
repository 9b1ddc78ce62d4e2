"""One optimization job and many: ``pipeline`` (load, optimize, write, verify, benchmark), verification
in a fresh process (``verification``, ``verify_child``), samples, timing, and batch runs (``config``,
``batch``, ``batch_worker``) with isolated child processes (``children``)."""
