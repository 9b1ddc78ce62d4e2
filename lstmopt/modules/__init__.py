"""The modules lstmopt swaps in: ``PackedLSTM`` (``lstm``), its packs (``packs``), the guard that keeps
bad input from the kernels (``guards``) and what its scripted form runs (``scripted``)."""
