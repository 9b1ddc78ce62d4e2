"""Inputs the op cannot take must never reach it: each gives nn.LSTM's result or nn.LSTM's error."""

import pytest
import torch

from conftest import ROOT, needs_native, run_python_json
from hostile_inputs import CASES, SCRIPTABLE, SEQUENCE_CASES


@pytest.fixture(scope="module")
def report():
    # One fresh interpreter for the whole battery: several of these inputs kill a process at the raw op.
    return run_python_json(
        f"import runpy, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
        f"runpy.run_path({str(ROOT / 'tests' / 'hostile_inputs.py')!r}, run_name='__main__')"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_lstm_behaves_like_nn_lstm(report, case):
    ref, packed = report[case]["ref"], report[case]["packed"]
    assert packed == ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_cell_kernel_behaves_like_nn_lstm_within_1e6(report, case):
    ref, cell = report[case]["ref"], report[case]["cell"]
    if not ref["ok"]:
        assert cell == ref
        return
    assert cell["ok"] and cell["shapes"] == ref["shapes"]
    for expected, actual in zip(ref["out"], cell["out"]):
        torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), atol=1e-6, rtol=1e-6)


def _last_line(message):
    return message.strip().splitlines()[-1]


def assert_within_1e6_or_same_error(ref, actual, *, scripted=False):
    """``ref``: nn.LSTM's outcome, eager or (``scripted``) scripted. A scripted error must be of scripted
    nn.LSTM's class with its final line (TorchScript prefixes a traceback naming the source files)."""
    if not ref["ok"]:
        if scripted:
            assert not actual["ok"] and actual["type"] == ref["type"], (actual, ref)
            assert _last_line(ref["message"]) in actual["message"], (actual, ref)
        else:
            assert actual == ref
        return
    assert actual["ok"] and actual["shapes"] == ref["shapes"]
    for expected, got in zip(ref["out"], actual["out"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(SCRIPTABLE - set(SEQUENCE_CASES)))
def test_scripted_packed_lstm_behaves_like_scripted_nn_lstm(report, case):
    ref, scripted = report[case]["ref"], report[case]["scripted"]
    if ref["ok"]:
        assert scripted == ref
    else:  # the same exception class as scripted nn.LSTM (a RuntimeError from the op, say, not torch.jit.Error)
        assert_within_1e6_or_same_error(report[case]["scripted_ref"], scripted, scripted=True)


@pytest.mark.parametrize("case", sorted(SEQUENCE_CASES))
def test_the_sequence_kernel_behaves_like_nn_lstm_within_1e6(report, case):
    assert_within_1e6_or_same_error(report[case]["ref"], report[case]["sequences"])
    assert_within_1e6_or_same_error(report[case]["scripted_ref"], report[case]["scripted"], scripted=True)


def test_the_battery_covers_the_inputs_that_crash_the_raw_op(report):
    for case in ("zero_batch", "zero_steps", "transposed_input", "wrong_input_size", "seq_rows_do_not_add_up",
                 "seq_indices_out_of_range"):
        assert case in report


def test_the_sequence_kernel_ran_where_it_could(report):
    # The control: well-formed packed sequences really took the sequence kernel (they differ from nn.LSTM's
    # kernel in the last bits), so the comparisons above are not of nn.LSTM with itself.
    assert report["seq_unsorted"]["sequences"] != report["seq_unsorted"]["ref"]


@needs_native
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_native_kernel_behaves_like_nn_lstm_within_1e6(report, case):
    assert_within_1e6_or_same_error(report[case]["ref"], report[case]["native"])
    if case in SCRIPTABLE:
        assert_within_1e6_or_same_error(report[case]["scripted_ref"], report[case]["scripted_native"], scripted=True)


@needs_native
def test_the_native_kernel_ran_where_it_could(report):
    for case in ("single_step_with_state", "transposed_input", "seq_unsorted", "seq_with_state"):
        assert report[case]["native"] != report[case]["ref"]
        assert report[case]["scripted_native"] != report[case]["ref"]
