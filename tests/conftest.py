import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lstmopt import PackedLSTM, native

ROOT = Path(__file__).resolve().parents[1]
BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no native bf16 support in oneDNN")
# Built on first use (about 30 s, once per machine). tests/test_native.py fails where a compiler is
# present and the build fails, so these skips only ever mean "no compiler here".
NATIVE = native.available()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernel unavailable: {native.unavailable_reason()}")
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


def run_python_json(code: str, **kwargs):
    """Run code that prints one JSON document last; fail with its stderr if it dies."""
    proc = run_python(code, **kwargs)
    assert proc.returncode == 0, f"subprocess died with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


class KernelCalls(dict):
    """How many times each fast path served a call while counting: ``onednn`` (one per layer and
    direction, on packed weights), ``cell``, ``native``, ``onednn_sequence``, ``native_sequence``, and
    ``repack`` (packs made again). A test that claims a kernel ran or a repack happened asserts it here:
    every fallback is nn.LSTM and gives the same results, so outputs alone cannot tell."""

    def __missing__(self, key):
        return 0


@contextlib.contextmanager
def counting_kernels():
    """``with counting_kernels() as calls: ...``, then ``calls["onednn"]`` and so on (see ``KernelCalls``)."""
    from lstmopt.modules import lstm as module

    calls = KernelCalls()
    op, run_cells, run_sequence = torch.mkldnn_rnn_layer, module.run_cells, module.run_onednn_sequence
    run_native, repack, run_seq_method = PackedLSTM._run_native, PackedLSTM._repack, PackedLSTM._run_sequence

    def onednn(*args):
        assert args[1].is_mkldnn  # always on packed weights
        calls["onednn"] += 1
        return op(*args)

    def cells(*args, **kwargs):
        calls["cell"] += 1
        return run_cells(*args, **kwargs)

    def sequence(*args, **kwargs):
        calls["onednn_sequence"] += 1
        return run_sequence(*args, **kwargs)

    def native_call(self, *args):
        result = run_native(self, *args)
        calls["native"] += result is not None
        return result

    def sequence_call(self, *args):
        calls["native_sequence"] += self.sequence_kernel == "native"
        return run_seq_method(self, *args)

    def repacked(self, *args, **kwargs):
        calls["repack"] += 1
        return repack(self, *args, **kwargs)

    torch.mkldnn_rnn_layer, module.run_cells, module.run_onednn_sequence = onednn, cells, sequence
    PackedLSTM._run_native, PackedLSTM._repack, PackedLSTM._run_sequence = native_call, repacked, sequence_call
    try:
        yield calls
    finally:
        torch.mkldnn_rnn_layer, module.run_cells, module.run_onednn_sequence = op, run_cells, run_sequence
        PackedLSTM._run_native, PackedLSTM._repack, PackedLSTM._run_sequence = run_native, repack, run_seq_method


@pytest.fixture
def kernel_calls():
    """The calls each fast path served during the test (``counting_kernels``)."""
    with counting_kernels() as calls:
        yield calls
