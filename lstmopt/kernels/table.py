"""Every kernel a packed module can run, declared once.

Dispatch (which kernels read packs or need the native library), autotune (the candidates, exact or not),
the rewrite's reasons, the reports, the CLI help and ``docs/design.md`` (between its kernel-table
markers, ``markdown()``) all read this table. A new kernel is one entry here plus its code in ``kernels/`` and its branch in the
module's dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lstmopt.kernels.accuracy import CONTRACT

__all__ = ["CELL", "GRU", "GRU_CELL", "RNN", "Kernel", "SEQUENCE", "TENSOR", "TABLE", "WEIGHTS_FORMATS", "WeightsFormat",
           "approximate_kernels_text", "default", "find", "markdown", "names", "weights_format"]

TENSOR, SEQUENCE = "tensors", "PackedSequences"
CELL = "nn.LSTMCell steps"  # the kernels of a PackedLSTMCell
GRU = "nn.GRU calls"  # the kernels of a PackedGRU: tensors and PackedSequences
GRU_CELL = "nn.GRUCell steps"  # the kernels of a PackedGRUCell
RNN = "nn.RNN calls"  # the kernels of a PackedRNN: tensors and PackedSequences


@dataclass(frozen=True)
class Kernel:
    name: str
    inputs: str  # TENSOR or SEQUENCE (a PackedLSTM's), CELL, GRU, GRU_CELL or RNN
    exact: bool  # bit-identical to nn.LSTM (else held to the approximate-kernel contract, kernels/accuracy.py)
    default: bool  # what a PackedLSTM runs until autotune says otherwise
    fp32_only: bool  # else also the packed dtype (bf16)
    reads_packs: bool  # the oneDNN packs must be kept while it is in use
    native: bool  # needs lstmopt's native library
    what: str  # one line for docs and help
    chosen_because: Optional[str] = None  # autotune's reason when it picks this kernel over the default
    single_step: bool = False  # serves only calls of one time step (others take nn.LSTM's path)
    projection: bool = False  # serves LSTMs with proj_size > 0 (LSTMP)


TABLE = (
    Kernel("onednn", TENSOR, exact=True, default=True, fp32_only=False, reads_packs=True, native=False,
           what="the packed oneDNN op, one aten.mkldnn_rnn_layer per layer and direction"),
    Kernel("cell", TENSOR, exact=False, default=False, fp32_only=True, reads_packs=False, native=False,
           what="one aten.lstm_cell per layer, for single-step calls",
           chosen_because="single steps through aten.lstm_cell measured fastest", single_step=True),
    Kernel("native", TENSOR, exact=False, default=False, fp32_only=True, reads_packs=False, native=True,
           what="lstmopt's native kernel: the whole call in one native call (with proj_size > 0, each step's "
                "projection fused after its cell updates)",
           chosen_because="lstmopt's native kernel measured fastest", projection=True),
    Kernel("stock", TENSOR, exact=True, default=False, fp32_only=False, reads_packs=False, native=False,
           what="nn.LSTM itself", chosen_because="nn.LSTM itself measured fastest on these inputs", projection=True),
    Kernel("stock", SEQUENCE, exact=True, default=True, fp32_only=False, reads_packs=False, native=False,
           what="nn.LSTM's own path, as eager runs PackedSequences", projection=True),
    Kernel("onednn", SEQUENCE, exact=False, default=False, fp32_only=False, reads_packs=True, native=False,
           what="the packed oneDNN op on each run of equal-length steps",
           chosen_because="PackedSequences through the oneDNN op on padded runs measured fastest"),
    Kernel("native", SEQUENCE, exact=False, default=False, fp32_only=True, reads_packs=False, native=True,
           what="lstmopt's native kernel on the packed rows",
           chosen_because="PackedSequences through lstmopt's native kernel measured fastest", projection=True),
    Kernel("aten", CELL, exact=True, default=True, fp32_only=False, reads_packs=False, native=False,
           what="ATen's own cell op (torch._VF.lstm_cell, what nn.LSTMCell runs) called directly: "
                "bit-identical, without nn.LSTMCell.forward's Python around it",
           chosen_because="ATen's cell op called directly measured fastest"),
    Kernel("native", CELL, exact=False, default=False, fp32_only=True, reads_packs=False, native=True,
           what="lstmopt's native kernel: the step in one native call",
           chosen_because="lstmopt's native kernel measured fastest"),
    Kernel("stock", CELL, exact=True, default=False, fp32_only=False, reads_packs=False, native=False,
           what="nn.LSTMCell itself", chosen_because="nn.LSTMCell itself measured fastest on these inputs"),
    Kernel("aten", GRU_CELL, exact=True, default=True, fp32_only=False, reads_packs=False, native=False,
           what="ATen's own cell op (torch._VF.gru_cell, what nn.GRUCell runs) called directly: "
                "bit-identical, without nn.GRUCell.forward's Python around it",
           chosen_because="ATen's cell op called directly measured fastest"),
    Kernel("native", GRU_CELL, exact=False, default=False, fp32_only=True, reads_packs=False, native=True,
           what="lstmopt's native kernel: the step in one native call",
           chosen_because="lstmopt's native kernel measured fastest"),
    Kernel("stock", GRU_CELL, exact=True, default=False, fp32_only=False, reads_packs=False, native=False,
           what="nn.GRUCell itself", chosen_because="nn.GRUCell itself measured fastest on these inputs"),
    # No exact kernel exists for a GRU (eager runs its own cell loop): it is packed only with --approx.
    Kernel("native", GRU, exact=False, default=True, fp32_only=True, reads_packs=False, native=True,
           what="lstmopt's native kernel: the whole call in one native call, tensors and PackedSequences",
           chosen_because="lstmopt's native kernel measured fastest"),
    Kernel("stock", GRU, exact=True, default=False, fp32_only=False, reads_packs=False, native=False,
           what="nn.GRU itself", chosen_because="nn.GRU itself measured fastest on these inputs"),
    # Nor for an RNN (tanh or relu): eager's cell loop sums in its own order.
    Kernel("native", RNN, exact=False, default=True, fp32_only=True, reads_packs=False, native=True,
           what="lstmopt's native kernel: the whole call in one native call, tensors and PackedSequences",
           chosen_because="lstmopt's native kernel measured fastest"),
    Kernel("stock", RNN, exact=True, default=False, fp32_only=False, reads_packs=False, native=False,
           what="nn.RNN itself", chosen_because="nn.RNN itself measured fastest on these inputs"),
)


@dataclass(frozen=True)
class WeightsFormat:
    """A format the native kernel's packs hold weights in: ``PackedLSTM.use_kernel(native_weights=name)``, what
    ``optimize(dtype=...)`` asks for (the parameters stay fp32). The C++ pack op refuses what this table does."""

    name: str  # "float32", "bfloat16" or "int8", as torch names the dtype
    short: str  # in reasons: "fp32", "bf16", "int8"
    projection: bool  # serves LSTMs with proj_size > 0
    kinds: tuple[str, ...]  # the kinds of module (``Decision.kind``) whose weights it serves
    what: str  # a packed module's reason, for the low-precision formats

    def projection_obstacle(self) -> str:
        return f"{self.name} serves LSTMs without a projection (proj_size=0)"

    def kind_obstacle(self) -> str:
        """What a module of another kind, asked for these weights, is told (it runs float32)."""
        return f"{self.name} weights serve nn.{' and nn.'.join(self.kinds)} only"


_EVERY_KIND = ("LSTM", "GRU", "LSTMCell", "GRUCell", "RNN")
WEIGHTS_FORMATS = (
    WeightsFormat("float32", "fp32", projection=True, kinds=_EVERY_KIND, what="fp32 weights"),
    WeightsFormat("bfloat16", "bf16", projection=True, kinds=("LSTM",),
                  what=("bf16 weights on lstmopt's native kernel (this CPU has no native bf16 in oneDNN), activations, "
                        "state and sums fp32: changes numerics")),
    WeightsFormat("int8", "int8", projection=False, kinds=("LSTM",),
                  what=("int8 weights (a scale per gate row) on lstmopt's native kernel, activations int16 per row, "
                        "state and sums fp32: changes numerics")),
)


def weights_format(name: str) -> WeightsFormat:
    for found in WEIGHTS_FORMATS:
        if found.name == name:
            return found
    known = [repr(w.name) for w in WEIGHTS_FORMATS]
    raise ValueError(f"native_weights must be {', '.join(known[:-1])} or {known[-1]}, got {name!r}")


def names(inputs: str, *, exact_only: bool = False, projection: bool = False) -> tuple[str, ...]:
    """The kernels for ``inputs`` (``TENSOR``, ``SEQUENCE``, ``CELL``, ``GRU``, ``GRU_CELL`` or ``RNN``), in autotune's order
    (``projection``: only those that serve proj_size > 0)."""
    return tuple(k.name for k in TABLE if k.inputs == inputs and (k.exact or not exact_only)
                 and (k.projection or not projection))


def find(name: str, inputs: str) -> Kernel:
    for kernel in TABLE:
        if kernel.name == name and kernel.inputs == inputs:
            return kernel
    raise KeyError(f"no kernel {name!r} for {inputs}")


def default(inputs: str) -> str:
    return next(k.name for k in TABLE if k.inputs == inputs and k.default)


def approximate_kernels_text() -> str:
    """The approximate kernels in words, for the CLI help: "the cell kernel (for tensors), ..."."""
    return ", ".join(f"{k.name} ({k.inputs})" for k in TABLE if not k.exact)


def markdown() -> str:
    """The table as docs/design.md shows it (between its kernel-table markers)."""
    rows = ["| kernel | for | chosen | results | what it is |", "|---|---|---|---|---|"]
    for k in TABLE:
        chosen = "by default" if k.default else ("by autotune" if k.exact else "by autotune with `--approx`")
        if k.inputs in (CELL, GRU, GRU_CELL, RNN) and not k.exact:  # no exact kernel to keep by default under --approx
            chosen = "with `--approx`, unless autotune measures another faster"
        elif k.projection and not k.exact:  # nor do LSTMs with proj_size > 0
            chosen += "; with `--approx` for proj_size > 0"
        needs = ", fp32" if k.fp32_only else ""
        needs += ", proj_size > 0 too" if k.projection and k.inputs not in (CELL, GRU_CELL) else ""
        needs += ", needs the native library" if k.native else ""
        original = k.inputs.split()[0] if k.inputs.startswith("nn.") else "nn.LSTM"  # "nn.GRU calls": nn.GRU
        results = f"bit-identical to `{original}`" if k.exact else CONTRACT
        rows.append(f"| `{k.name}` | {k.inputs}{needs} | {chosen} | {results} | {k.what} |")
    return "\n".join(rows) + "\n"
