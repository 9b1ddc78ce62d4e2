"""Rewriting a model: which LSTMs can be packed and the swap (``swap``), and choosing each one's kernel
by timing it on the calls it receives (``autotune``)."""
