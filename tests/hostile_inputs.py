"""Run every hostile call on nn.LSTM, PackedLSTM and a scripted PackedLSTM; print one JSON report.

Run as a script in its own process (tests/test_errors.py does): the raw op would kill the interpreter on
several of these inputs, so a crash must not take pytest down with it.
"""

import json
import sys
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from lstmopt import PackedLSTM

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
SCRIPTABLE = {name for name in CASES} - {
    "state_as_list", "state_three_tensors", "state_single_tensor", "state_with_none", "input_not_a_tensor",
}


class Call(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        return self.lstm(x, hx)


def outcome(module, x, hx):
    try:
        with torch.no_grad():
            out, (h, c) = module(x, hx)
        return {"ok": True, "out": [out.float().nan_to_num(1.0).tolist(), h.float().nan_to_num(1.0).tolist(),
                                    c.float().nan_to_num(1.0).tolist()], "shapes": [list(out.shape), list(h.shape)]}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def main():
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=L, bidirectional=True).eval()
    packed = PackedLSTM.from_lstm(ref).eval()
    scripted = torch.jit.script(Call(PackedLSTM.from_lstm(ref).eval()))
    cell = PackedLSTM.from_lstm(ref).eval()
    cell.use_kernel("cell")
    report = {}
    for name, make in CASES.items():
        print(name, file=sys.stderr, flush=True)  # the last name printed is the culprit if we die
        torch.manual_seed(1)
        x, hx = make()
        report[name] = {"ref": outcome(ref, x, hx), "packed": outcome(packed, x, hx), "cell": outcome(cell, x, hx)}
        if name in SCRIPTABLE:
            report[name]["scripted"] = outcome(scripted, x, hx)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
