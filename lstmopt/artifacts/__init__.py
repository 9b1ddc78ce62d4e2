"""Files in and out: loading a saved model without running its code (``loading``, ``checkpoints``),
writing artifacts (``writing``, ``tracing``), their metadata record (``metadata``), and safe file handling
(``files``)."""
