"""Exceptions lstmopt raises for conditions a user can act on.

Each message is one line that says what went wrong and what to do; the CLI prints it as is and exits
with the class's ``exit_code`` (documented in the README), keeping tracebacks for ``--debug``.
"""


class LstmoptError(Exception):
    """Base class of the errors a user can act on."""

    exit_code = 1


class UsageError(LstmoptError):
    """Bad usage or unreadable input: a wrong option, a missing, corrupt or foreign file, a bad config."""

    exit_code = 2


class UntrustedPickleError(LstmoptError):
    """Loading the file would run code from it (a pickled module, a TorchScript archive) without ``--trust``."""

    exit_code = 3


class NothingToOptimizeError(LstmoptError):
    """The model has no LSTM lstmopt can pack (an error only when the caller requires one)."""

    exit_code = 4


class VerificationError(LstmoptError):
    """The written artifact does not reproduce the original model within the tolerance."""

    exit_code = 5


class SpeedupError(LstmoptError):
    """The optimized model is slower than the required minimum speedup."""

    exit_code = 6


class UnsupportedError(LstmoptError):
    """The request cannot be served on this machine (for example bf16 without native CPU support)."""

    exit_code = 2
