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


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message (or a text) as one line of at most ``limit`` characters, without tensor values:
    messages from torch and from user code print whole tensors (``Value: (tensor([[ 0.66, ...``), which are
    the user's data and bury the point; each becomes its shape and dtype, or ``tensor(...)``."""
    text = without_tensor_values(" ".join(str(exc).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def without_tensor_values(text: str) -> str:
    """``text`` with each printed tensor (``tensor([...], dtype=...)``) replaced by ``<tensor 2x3 int8>`` (its
    shape, and its dtype where torch printed one), or ``<tensor>`` where the print was cut short."""
    out, start = [], 0
    while (found := text.find("tensor(", start)) != -1:
        if found and (text[found - 1].isalnum() or text[found - 1] == "_"):  # mytensor(...)
            out.append(text[start:found + 1])
            start = found + 1
            continue
        end = _closing(text, found + len("tensor("))
        out.append(text[start:found] + _summary(text[found + len("tensor("):end]))
        start = end + 1
    return "".join(out) + text[start:]


def _closing(text: str, start: int) -> int:
    """The index of the parenthesis closing the one opened before ``start`` (the end if it is cut off)."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text)


def _summary(inside: str) -> str:
    inside = inside.strip()
    if inside.startswith("["):
        end = _closing_bracket(inside)
        data, rest = inside[:end + 1], inside[end + 1:]
        shape = None if end == len(inside) or "..." in data else "x".join(map(str, _shape(data)))
    else:  # a scalar, or cut off
        data, _, rest = inside.partition(",")
        shape = "scalar" if data and "=" not in data else None
    dtype = next((part.split("=", 1)[1].strip().removeprefix("torch.") for part in rest.split(",")
                  if part.strip().startswith("dtype=")), None)
    if "size=(" in rest:  # torch prints an empty tensor's shape
        shape = "x".join(d.strip() for d in rest.split("size=(", 1)[1].split(")", 1)[0].split(",") if d.strip())
    return "<" + " ".join(p for p in ("tensor", shape, dtype) if p) + ">"


def _closing_bracket(text: str) -> int:
    depth = 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth == 0:
            return i
    return len(text)


def _shape(data: str):
    """The shape of a printed nested list such as ``[[1., 2.], [3., 4.]]`` (its first element at each depth)."""
    shape, text = [], data
    while text.startswith("["):
        depth, count, i = 0, 1, 0
        for i, char in enumerate(text):
            depth += {"[": 1, "]": -1}.get(char, 0)
            if char == "," and depth == 1:
                count += 1
            if depth == 0:
                break
        body = text[1:i].strip()
        shape.append(0 if not body else count)
        text = body
    return shape
