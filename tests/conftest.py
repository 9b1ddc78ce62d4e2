import contextlib
import json
import os
import shutil
import signal
import subprocess
import types
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

from lstmopt import PackedLSTM, native

# The property tests draw the same examples on every run, CI's included: a red run is a finding anyone can
# reproduce, not the luck of a draw. HYPOTHESIS_PROFILE=explore draws new examples on each run, to search.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no native bf16 support in oneDNN")
# Built when lstmopt was installed. tests/test_native.py fails where lstmopt is installed and the library
# does not load, so these skips only ever mean "run from a source tree, with no compiler here".
NATIVE = native.available()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernel unavailable: {native.unavailable_reason()}")
needs_compiler = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "c++")), reason="no C++ compiler here")
SCRIPT = shutil.which("lstmopt") or pytest.fail("the lstmopt console script is not installed")


def invoke(*args):
    """The lstmopt command line run in this process (typer's CliRunner), wide enough that no table cell
    wraps; ``result.exit_code``, ``.stdout``, ``.stderr``."""
    from typer.testing import CliRunner

    from lstmopt.cli import app

    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


# What autotune times besides the stock and oneDNN kernels, with exact=False
APPROX_EXTRA = {"native"} if NATIVE else set()


def lstm_pair(input_size=12, hidden_size=20, seed=0, **kwargs):
    """A stock nn.LSTM in eval mode and a PackedLSTM with the same weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(input_size, hidden_size, **kwargs).eval()
    return ref, PackedLSTM.from_lstm(ref)


def assert_same_result(expected, actual):
    """Bit-identical output and states (and the same dtypes and shapes)."""
    out_e, (h_e, c_e) = expected
    out_a, (h_a, c_a) = actual
    for e, a in ((out_e, out_a), (h_e, h_a), (c_e, c_a)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"max abs diff {(a.float() - e.float()).abs().max().item()}"


def run_python(code: str, *, cwd=None, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (for calls that could kill one, and for fresh-process loads)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


def _interruptible() -> None:
    # A suite launched in the background inherits SIGINT ignored, and a child would too: Python then installs no
    # KeyboardInterrupt handler, and a test's Ctrl-C would do nothing. Give the child the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def started(args, **kwargs):
    """``subprocess.Popen(args)`` in a session of its own, with SIGINT's default handler; whatever the test does,
    the process and everything it started (a batch's workers) are killed when the block ends."""
    proc = subprocess.Popen(args, preexec_fn=_interruptible, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_python_json(code: str, **kwargs):
    """Run code that prints one JSON document last; fail with its stderr if it dies."""
    proc = run_python(code, **kwargs)
    assert proc.returncode == 0, f"subprocess died with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


class KernelCalls(dict):
    """How many times each fast path served a call while counting: ``onednn`` (one per layer and
    direction, on packed weights), ``cell``, ``native``, ``onednn_sequence``, ``native_sequence``, an
    LSTMCell's or GRUCell's ``aten cell`` and ``stock cell`` steps, and ``repack`` (packs made again). A test that
    claims a kernel ran or a repack happened asserts it here: every fallback is nn.LSTM and gives the same
    results, so outputs alone cannot tell."""

    def __missing__(self, key):
        return 0


@contextlib.contextmanager
def counting_kernels():
    """``with counting_kernels() as calls: ...``, then ``calls["onednn"]`` and so on (see ``KernelCalls``)."""
    from lstmopt.modules import dispatch
    from lstmopt.modules.pack_state import PackState

    calls = KernelCalls()
    op = torch.mkldnn_rnn_layer
    originals = {name: getattr(dispatch, name) for name in ("run_cells", "run_onednn_sequence", "run_native",
                                                            "run_sequence", "_VF", "_stock_cell",
                                                            "_stock_gru_cell")}
    refresh = PackState.refresh

    def onednn(*args):
        assert args[1].is_mkldnn  # always on packed weights
        calls["onednn"] += 1
        return op(*args)

    def cells(*args, **kwargs):
        calls["cell"] += 1
        return originals["run_cells"](*args, **kwargs)

    def sequence(*args, **kwargs):
        calls["onednn_sequence"] += 1
        return originals["run_onednn_sequence"](*args, **kwargs)

    def native_call(*args):
        result = originals["run_native"](*args)
        calls["native"] += result is not None
        return result

    def sequence_call(module, *args):
        calls["native_sequence"] += module.sequence_kernel == "native"
        return originals["run_sequence"](module, *args)

    def aten_cell(*args):
        calls["aten cell"] += 1
        return torch._VF.lstm_cell(*args)

    def aten_gru_cell(*args):
        calls["aten cell"] += 1
        return torch._VF.gru_cell(*args)

    def stock_cell(*args):
        calls["stock cell"] += 1
        return originals["_stock_cell"](*args)

    def stock_gru_cell(*args):
        calls["stock cell"] += 1
        return originals["_stock_gru_cell"](*args)

    def refreshed(self, *args, **kwargs):
        calls["repack"] += 1
        return refresh(self, *args, **kwargs)

    torch.mkldnn_rnn_layer, PackState.refresh = onednn, refreshed
    for name, counted in (("run_cells", cells), ("run_onednn_sequence", sequence), ("run_native", native_call),
                          ("run_sequence", sequence_call), ("_VF", types.SimpleNamespace(lstm_cell=aten_cell, gru_cell=aten_gru_cell)),
                          ("_stock_cell", stock_cell), ("_stock_gru_cell", stock_gru_cell)):
        setattr(dispatch, name, counted)
    try:
        yield calls
    finally:
        torch.mkldnn_rnn_layer, PackState.refresh = op, refresh
        for name, original in originals.items():
            setattr(dispatch, name, original)


@pytest.fixture
def kernel_calls():
    """The calls each fast path served during the test (``counting_kernels``)."""
    with counting_kernels() as calls:
        yield calls


def assert_calls_see_whole_weights(packed, originals, x, result) -> None:
    """Two threads call ``packed`` on ``x`` while this one loads ``originals``' state dicts into it in turn:
    every call's ``result(output)`` must be one of the originals' (the old weights or the new, whole)."""
    import threading

    with torch.no_grad():
        allowed = [result(m(x)) for m in originals]
    errors = []

    def call():
        with torch.no_grad():
            for _ in range(300):
                got = result(packed(x))
                if not any(torch.allclose(got, a, atol=1e-5) for a in allowed):
                    errors.append(got)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(50):
        packed.load_state_dict(originals[i % 2].state_dict())
    for t in threads:
        t.join()
    assert not errors
