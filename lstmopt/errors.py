"""Exceptions lstmopt raises for conditions a user can act on (the CLI maps each to an exit code)."""


class LstmoptError(Exception):
    """Base class: the message is one line that says what went wrong and what to do."""


class UnsupportedError(LstmoptError):
    """The request cannot be served on this machine (for example bf16 without native CPU support)."""
