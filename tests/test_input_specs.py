"""``--input`` specs (lstmopt/job/input_specs.py): integer ids, lengths and tuples described on the command line."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import invoke
from lstmopt.errors import UsageError, one_line, without_tensor_values
from lstmopt.job.input_specs import parse_inputs, samples_from_specs


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 9), steps=st.integers(1, 40), vocab=st.integers(2, 500), features=st.integers(1, 8))
def test_samples_hold_what_the_specs_say_at_two_batch_sizes_and_two_lengths(batch, steps, vocab, features):
    specs = [f"int64[T={steps},B={batch}]:0..{vocab}", "lengths[B]", f"(float32[1,B,{features}], float32[1,B,4])"]
    samples = samples_from_specs(*parse_inputs(specs))
    sizes = {(ids.shape[1], ids.shape[0]) for ids, _, _ in samples}
    assert (batch, steps) in sizes and len(sizes) == len(samples) == len({b for b, _ in sizes}) * len({t for _, t in sizes})
    for ids, lengths, (h, c) in samples:
        t, b = ids.shape
        assert ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < vocab
        assert lengths.shape == (b,) and lengths[0] == t and bool((lengths[:-1] >= lengths[1:]).all())
        assert lengths.min() >= 1 and h.shape == (1, b, features) and c.shape == (1, b, 4) and h.dtype == torch.float32
    assert all(torch.equal(a[0], b[0]) for a, b in zip(samples, samples_from_specs(*parse_inputs(specs))))


@pytest.mark.parametrize("specs, message", [
    (["int64[B=2,T=5]"], "integers need their range as LOW..HIGH"),
    (["int64[B=2]:9..3"], "integers need their range as LOW..HIGH"),
    (["float32[B,3]"], "give B a value once, as B=N"),
    (["float32[B=2,3]", "float32[B=4,3]"], "B is given two values (2 and 4)"),
    (["float32[B=2,0]"], "a dimension must be a positive number, B or T"),
    (["float32[B=2,X]"], "a dimension must be a positive number, B or T"),
    (["complex[2]"], "unknown dtype 'complex'"),
    (["lengths[B=2,T=3]"], "lengths take one dimension, the batch"),
    (["float32[2]:0..1"], "only integer inputs take a range"),
    (["(float32[2], float32[2]"], "a '(' is not closed"),
    (["float32[2], float32[2]"], "one argument per --input"),
    (["float32[2] !"], "cannot read it from character"),
    (["float32[B=100000,T=100000,100]"], "over the"),
])
def test_a_bad_spec_is_a_one_line_error_that_says_what_to_write(specs, message):
    with pytest.raises(UsageError, match=".*".join(map(__import__("re").escape, message.split("*")))) as info:
        samples_from_specs(*parse_inputs(specs))
    assert "\n" not in str(info.value)


def test_the_command_line_takes_specs_for_a_model_of_ids_and_a_state_tuple(tmp_path, monkeypatch):
    import package_patterns

    monkeypatch.chdir(tmp_path)
    torch.save(package_patterns.build_char_language_model().state_dict(), "lm.pt")
    result = invoke("optimize", "lm.pt", "-o", "lm.opt.pt", "--factory", "package_patterns:build_char_language_model",
                    "--input", "int64[T=16,B=2]:0..31", "--input", "(float32[1,B,32], float32[1,B,32])", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["options"]["inputs"] == ["int64[T=16,B=2]:0..31", "(float32[1,B,32], float32[1,B,32])"]
    assert report["verification"]["samples"][0] == "(16, 2) int64, [(1, 2, 32), (1, 2, 32)]"
    assert report["verification"]["ok"] and report["verification"]["max_abs_error"] == 0


def test_error_lines_show_tensors_as_shapes_and_dtypes_never_their_values():
    x = torch.tensor([[0.6657, -1.2345, 3.25], [4.5, 5.5, 6.5]])
    ids = torch.tensor([3, 1, 4], dtype=torch.int8)
    message = f"forward() Expected a Tensor but found ({x!r}, {ids!r}); also {torch.zeros(2, 0)!r}"
    line = one_line(ValueError(message))
    assert "<tensor 2x3>" in line and "<tensor 3 int8>" in line and "<tensor 2x0>" in line
    assert not any(value in line for value in ("0.6657", "1.2345", "3.25", "4.5"))
    cut_off = without_tensor_values("Tracer cannot infer type of Out(prediction=tensor([[[-0.0746, 0.1420, ")
    assert cut_off == "Tracer cannot infer type of Out(prediction=<tensor>"
    assert without_tensor_values(line) == line  # a line said twice says the same


def test_a_models_own_error_is_reported_without_the_tensors_it_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "picky.py").write_text(
        "import torch\n\nclass Picky(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lstm = torch.nn.LSTM(3, 4)\n\n    def forward(self, x):\n"
        "        if x.shape[1] != 2:\n            raise ValueError(f'batch of two expected, got {x}')\n"
        "        return self.lstm(x)[0]\n\ndef build():\n    return Picky()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(__import__("picky").build().state_dict(), "w.pt")
    result = invoke("optimize", "w.pt", "-o", "o.pt", "--factory", "picky:build", "--input", "float32[5,B=3,3]")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "got <tensor 5x3x3>" in line and "e-0" not in line
