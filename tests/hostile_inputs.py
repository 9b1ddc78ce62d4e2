"""Run every hostile call on nn.LSTM and on PackedLSTM under each kernel, eager and scripted; print one
JSON report.

Run as a script in its own process (tests/test_errors.py does): the raw op would kill the interpreter on
several of these inputs, so a crash must not take pytest down with it.
"""

import copy
import json
import sys
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstmopt import PackedLSTM, native

warnings.simplefilter("ignore")
I, H, L = 12, 20, 2
D = 2
S = L * D


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def state(*shape, dtype=torch.float32):
    return (randn(*shape, dtype=dtype), randn(*shape, dtype=dtype))


CASES = {
    # input shapes
    "input_1d": lambda: (randn(I), None),
    "input_4d": lambda: (randn(2, 5, 3, I), None),
    "wrong_input_size": lambda: (randn(5, 3, I + 1), None),
    "zero_steps": lambda: (randn(0, 3, I), None),
    "zero_steps_unbatched": lambda: (randn(0, I), None),
    "zero_batch": lambda: (randn(5, 0, I), None),
    "zero_batch_with_state": lambda: (randn(5, 0, I), state(S, 0, H)),
    "zero_features": lambda: (randn(5, 3, 0), None),
    # input dtype, layout and memory
    "float64_input": lambda: (randn(5, 3, I, dtype=torch.float64), None),
    "int_input": lambda: (torch.ones(5, 3, I, dtype=torch.int64), None),
    "bool_input": lambda: (torch.ones(5, 3, I, dtype=torch.bool), None),
    "bf16_input_into_fp32": lambda: (randn(5, 3, I, dtype=torch.bfloat16), None),
    "transposed_input": lambda: (randn(3, 5, I).transpose(0, 1), None),
    "strided_input": lambda: (randn(5, 3, 2 * I)[:, :, ::2], None),
    "expanded_input": lambda: (randn(5, 1, I).expand(5, 3, I), None),
    "sliced_batch_input": lambda: (randn(5, 6, I)[:, ::2], None),
    "sparse_input": lambda: (randn(5, 3, I).to_sparse(), None),
    "mkldnn_input": lambda: (randn(5, 3, I).to_mkldnn(), None),
    "nan_input": lambda: (torch.full((5, 3, I), float("nan")), None),
    # state
    "state_2d_with_batched_input": lambda: (randn(5, 3, I), state(S, H)),
    "state_3d_with_unbatched_input": lambda: (randn(5, I), state(S, 1, H)),
    "state_wrong_batch": lambda: (randn(5, 3, I), state(S, 2, H)),
    "state_wrong_layers": lambda: (randn(5, 3, I), state(S - 1, 3, H)),
    "state_wrong_hidden": lambda: (randn(5, 3, I), state(S, 3, H + 1)),
    "cell_wrong_shape": lambda: (randn(5, 3, I), (randn(S, 3, H), randn(S, 3, H + 1))),
    "state_float64": lambda: (randn(5, 3, I), state(S, 3, H, dtype=torch.float64)),
    "state_transposed": lambda: (randn(5, 3, I), tuple(t.transpose(0, 1) for t in state(3, S, H))),
    "state_expanded": lambda: (randn(5, 3, I), (randn(S, 1, H).expand(S, 3, H), randn(S, 1, H).expand(S, 3, H))),
    "unbatched_with_state": lambda: (randn(5, I), state(S, H)),
    "state_as_list": lambda: (randn(5, 3, I), list(state(S, 3, H))),
    "state_three_tensors": lambda: (randn(5, 3, I), (*state(S, 3, H), randn(S, 3, H))),
    "state_single_tensor": lambda: (randn(5, 3, I), randn(S, 3, H)),
    "state_with_none": lambda: (randn(5, 3, I), (randn(S, 3, H), None)),
    "input_not_a_tensor": lambda: ([[1.0] * I] * 5, None),
    # single steps: the "cell" kernel's territory
    "single_step": lambda: (randn(1, 3, I), None),
    "single_step_with_state": lambda: (randn(1, 3, I), state(S, 3, H)),
    "single_step_unbatched_with_state": lambda: (randn(1, I), state(S, H)),
    "single_step_transposed_state": lambda: (randn(1, 3, I), tuple(t.transpose(0, 1) for t in state(3, S, H))),
    "single_step_wrong_state": lambda: (randn(1, 3, I), state(S, 2, H)),
    "single_step_zero_batch": lambda: (randn(1, 0, I), None),
}
def packed(lengths, *, enforce_sorted=False, dtype=torch.float32, features=I):
    lengths = torch.tensor(lengths)
    x = randn(len(lengths), int(lengths.max()), features, dtype=dtype)
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)


def raw_sequence(rows, batch_sizes, sorted_indices=None, unsorted_indices=None, dtype=torch.float32):
    return PackedSequence(randn(rows, I, dtype=dtype), torch.tensor(batch_sizes), sorted_indices, unsorted_indices)


# PackedSequences: the sequence kernel indexes with their parts, so malformed ones must never reach it
SEQUENCE_CASES = {
    "seq_unsorted": lambda: (packed([7, 2, 5, 1]), None),
    "seq_sorted": lambda: (packed([7, 5, 2, 1], enforce_sorted=True), None),
    "seq_equal_lengths": lambda: (packed([4, 4, 4]), None),
    "seq_all_length_one": lambda: (packed([1, 1, 1]), None),
    "seq_single_sequence": lambda: (packed([6]), None),
    "seq_with_state": lambda: (packed([7, 2, 5, 1]), state(S, 4, H)),
    "seq_state_wrong_batch": lambda: (packed([7, 2, 5, 1]), state(S, 3, H)),
    "seq_state_wrong_layers": lambda: (packed([7, 2, 5, 1]), state(S - 1, 4, H)),
    "seq_state_2d": lambda: (packed([7, 2, 5, 1]), state(S, H)),
    "seq_state_float64": lambda: (packed([7, 2, 5, 1]), state(S, 4, H, dtype=torch.float64)),
    "seq_float64": lambda: (packed([3, 2], dtype=torch.float64), None),
    "seq_wrong_input_size": lambda: (packed([3, 2], features=I + 1), None),
    "seq_rows_do_not_add_up": lambda: (raw_sequence(10, [3, 3, 3]), None),
    "seq_increasing_batch_sizes": lambda: (raw_sequence(5, [2, 3]), None),
    "seq_zero_batch_size": lambda: (raw_sequence(3, [3, 0]), None),
    "seq_indices_not_a_permutation": lambda: (raw_sequence(6, [3, 3], torch.tensor([0, 0, 1]),
                                                           torch.tensor([0, 2, 1])), None),
    "seq_indices_out_of_range": lambda: (raw_sequence(6, [3, 3], torch.tensor([0, 5, 1]),
                                                      torch.tensor([0, 2, 1])), None),
    "seq_transposed_data": lambda: (PackedSequence(randn(I, 6).t(), torch.tensor([3, 3])), None),
}
CASES.update(SEQUENCE_CASES)

SCRIPTABLE = {name for name in CASES} - {
    "state_as_list", "state_three_tensors", "state_single_tensor", "state_with_none", "input_not_a_tensor",
}


class Call(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        return self.lstm(x, hx)


class CallWithSequence(Call):
    def forward(self, x: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]
                ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        return self.lstm(x, hx)


def outcome(module, x, hx):
    try:
        with torch.no_grad():
            out, (h, c) = module(x, hx)
        if not isinstance(out, Tensor):  # a PackedSequence (a plain tuple when it comes from TorchScript)
            out = out[0]
        return {"ok": True, "out": [out.float().nan_to_num(1.0).tolist(), h.float().nan_to_num(1.0).tolist(),
                                    c.float().nan_to_num(1.0).tolist()], "shapes": [list(out.shape), list(h.shape)]}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def main():
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=L, bidirectional=True).eval()
    packed = PackedLSTM.from_lstm(ref).eval()
    scripted = torch.jit.script(Call(PackedLSTM.from_lstm(ref).eval()))
    scripted_ref = torch.jit.script(Call(copy.deepcopy(ref)))  # what scripted code is held to
    scripted_ref_sequences = torch.jit.script(CallWithSequence(copy.deepcopy(ref)))
    cell = PackedLSTM.from_lstm(ref).eval()
    cell.use_kernel("cell")
    sequences = PackedLSTM.from_lstm(ref).eval()
    sequences.use_kernel(sequence_kernel="onednn")
    scripted_sequences = torch.jit.script(CallWithSequence(sequences))
    on_native = None
    if native.available():  # tests/test_native.py fails where it should be and is not
        on_native = PackedLSTM.from_lstm(ref).eval()
        on_native.use_kernel("native", sequence_kernel="native")
        scripted_native, scripted_native_sequences = (torch.jit.script(Call(on_native)),
                                                      torch.jit.script(CallWithSequence(on_native)))
    report = {}
    for name, make in CASES.items():
        print(name, file=sys.stderr, flush=True)  # the last name printed is the culprit if we die
        torch.manual_seed(1)
        x, hx = make()
        report[name] = {"ref": outcome(ref, x, hx), "packed": outcome(packed, x, hx), "cell": outcome(cell, x, hx)}
        if name in SEQUENCE_CASES:
            report[name]["sequences"] = outcome(sequences, x, hx)
            report[name]["scripted"] = outcome(scripted_sequences, x, hx)
            report[name]["scripted_ref"] = outcome(scripted_ref_sequences, x, hx)
        elif name in SCRIPTABLE:
            report[name]["scripted"] = outcome(scripted, x, hx)
            report[name]["scripted_ref"] = outcome(scripted_ref, x, hx)
        if on_native is not None:
            report[name]["native"] = outcome(on_native, x, hx)
            if name in SCRIPTABLE:
                scripted_one = scripted_native_sequences if name in SEQUENCE_CASES else scripted_native
                report[name]["scripted_native"] = outcome(scripted_one, x, hx)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
