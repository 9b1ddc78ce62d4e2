"""Which calls take the packed kernel, and that every other call computes exactly what nn.LSTM does."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import assert_same_result, counting_kernels, lstm_pair, needs_bf16
from lstmopt import PackedLSTM, UnsupportedError, optimize


def kernel_calls(packed: PackedLSTM):
    """The packed op's calls (one per layer and direction) while in the block (``conftest.counting_kernels``)."""
    return counting_kernels()


def test_eval_no_grad_takes_the_kernel_once_per_layer_and_direction():
    ref, packed = lstm_pair(num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 12)
    with torch.no_grad(), kernel_calls(packed) as calls:
        assert_same_result(ref(x), packed(x))
    assert calls["onednn"] == 4


def test_inference_mode_takes_the_kernel():
    ref, packed = lstm_pair()
    x = torch.randn(5, 3, 12)
    with torch.inference_mode(), kernel_calls(packed) as calls:
        assert_same_result(ref(x), packed(x))
    assert calls["onednn"]


def test_grad_mode_takes_the_stock_path_even_when_nothing_requires_grad():
    # With autograd on, eager runs oneDNN's training primitive, whose last bits differ from the inference
    # primitive's on some CPUs: only nn.LSTM's own path gives the same result.
    ref, packed = lstm_pair(num_layers=2)
    ref.requires_grad_(False)
    packed.requires_grad_(False)
    x = torch.randn(5, 3, 12)
    with kernel_calls(packed) as calls:
        actual = packed(x)
    assert not calls["onednn"] and not actual[0].requires_grad
    assert_same_result(ref(x), actual)


def test_grad_mode_with_trainable_weights_takes_the_stock_path_and_backpropagates():
    ref, packed = lstm_pair(num_layers=2)
    x = torch.randn(5, 3, 12)
    with kernel_calls(packed) as calls:
        out_p, _ = packed(x)
    assert not calls["onednn"] and out_p.requires_grad
    out_r, _ = ref(x)
    assert torch.equal(out_p, out_r)
    out_p.sum().backward()
    out_r.sum().backward()
    for (name, p), r in zip(packed.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, r.grad), name


def test_input_requiring_grad_takes_the_stock_path():
    ref, packed = lstm_pair()
    packed.requires_grad_(False)
    ref.requires_grad_(False)
    x = torch.randn(5, 3, 12, requires_grad=True)
    with kernel_calls(packed) as calls:
        out, _ = packed(x)
    assert not calls["onednn"] and out.requires_grad
    assert torch.equal(out, ref(x)[0])


def test_training_mode_takes_the_stock_path_with_dropout():
    ref, packed = lstm_pair(num_layers=3, dropout=0.5)
    ref.train()
    packed.train()
    x = torch.randn(5, 3, 12)
    with torch.no_grad(), kernel_calls(packed) as calls:
        torch.manual_seed(1)
        expected = ref(x)
        torch.manual_seed(1)
        actual = packed(x)
    assert not calls["onednn"]
    assert_same_result(expected, actual)


def test_packed_sequence_takes_the_stock_path():
    ref, packed = lstm_pair(bidirectional=True, batch_first=True)
    x = torch.randn(4, 7, 12)
    seq = pack_padded_sequence(x, torch.tensor([7, 2, 5, 1]), batch_first=True, enforce_sorted=False)
    with torch.no_grad(), kernel_calls(packed) as calls:
        out_p, (h_p, c_p) = packed(seq)
        out_r, (h_r, c_r) = ref(seq)
    assert not calls["onednn"]
    assert torch.equal(out_p.data, out_r.data) and torch.equal(out_p.unsorted_indices, out_r.unsorted_indices)
    assert torch.equal(h_p, h_r) and torch.equal(c_p, c_r)


def outcome(module, *args):
    """The result, or the error's type and message (eager itself fails on some CPUs, e.g. bf16 autocast)."""
    try:
        return module(*args)
    except Exception as exc:
        return type(exc), str(exc)


def test_autocast_takes_the_stock_path():
    ref, packed = lstm_pair()
    x = torch.randn(5, 3, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), kernel_calls(packed) as calls:
        expected, actual = outcome(ref, x), outcome(packed, x)
    assert not calls["onednn"]
    if isinstance(expected[0], type):
        assert actual == expected
    else:
        assert_same_result(expected, actual)


def test_disabled_mkldnn_takes_the_stock_path():
    ref, packed = lstm_pair()
    x = torch.randn(5, 3, 12)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), kernel_calls(packed) as calls:
        expected, actual = ref(x), packed(x)
    assert not calls["onednn"]
    assert_same_result(expected, actual)


def test_other_weight_dtype_takes_the_stock_path():
    ref, packed = lstm_pair()
    ref.double()
    packed.double()
    assert packed.packed_dtype is None
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    with torch.no_grad(), kernel_calls(packed) as calls:
        assert_same_result(ref(x), packed(x))
    assert not calls["onednn"]


def test_non_cpu_weights_take_the_stock_path():
    ref, packed = lstm_pair()
    ref.to("meta")
    packed.to("meta")
    assert packed.packed_dtype is None
    x = torch.randn(5, 3, 12, device="meta")
    with torch.no_grad(), kernel_calls(packed) as calls:
        out_p, (h_p, _) = packed(x)
        out_r, (h_r, _) = ref(x)
    assert not calls["onednn"]
    assert out_p.device.type == "meta" and out_p.shape == out_r.shape and h_p.shape == h_r.shape


def test_tensor_subclass_input_takes_the_stock_path():
    ref, packed = lstm_pair()
    x = nn.Parameter(torch.randn(5, 3, 12), requires_grad=False)
    with torch.no_grad(), kernel_calls(packed) as calls:
        assert_same_result(ref(x), packed(x))
    assert not calls["onednn"]


def test_state_given_as_a_list_is_served_by_the_kernel_like_a_tuple():
    ref, packed = lstm_pair()
    x, h, c = torch.randn(5, 3, 12), torch.randn(1, 3, 20), torch.randn(1, 3, 20)
    with torch.no_grad(), kernel_calls(packed) as calls:
        assert_same_result(ref(x, (h, c)), packed(x, [h, c]))
    assert calls["onednn"] == 1


def test_tracing_records_the_stock_op():
    ref, packed = lstm_pair(num_layers=2)
    x = torch.randn(5, 3, 12)
    with torch.no_grad():
        traced = torch.jit.trace(packed, x, check_trace=False)
        graph = str(traced.graph)
        assert "aten::lstm" in graph and "mkldnn_rnn_layer" not in graph
        assert_same_result(ref(x), traced(x))


@needs_bf16
def test_bf16_module_matches_eager_bf16_bit_for_bit():
    ref, packed = lstm_pair(num_layers=2, bidirectional=True)
    ref.bfloat16()
    packed.bfloat16()
    assert packed.packed_dtype == torch.bfloat16
    x = torch.randn(6, 2, 12, dtype=torch.bfloat16)
    with torch.no_grad(), kernel_calls(packed) as calls:
        assert_same_result(ref(x), packed(x))
    assert calls["onednn"]


@needs_bf16
def test_bf16_optimized_lstm_casts_at_its_boundary():
    ref, _ = lstm_pair(num_layers=2)
    fast = optimize(ref, dtype=torch.bfloat16)
    assert fast.weight_ih_l0.dtype == torch.bfloat16 and fast.io_dtype == torch.float32
    x = torch.randn(6, 2, 12)
    h = torch.randn(2, 2, 20), torch.randn(2, 2, 20)
    with torch.no_grad(), kernel_calls(fast) as calls:
        out, (h_n, c_n) = fast(x, h)
        expected, (h_e, c_e) = ref(x, h)
    assert calls["onednn"]
    assert out.dtype == h_n.dtype == c_n.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(h_n, h_e, atol=3e-2, rtol=3e-2)
    # bf16 inputs are not cast: they already match the weights
    with torch.no_grad():
        assert fast(x.bfloat16())[0].dtype == torch.bfloat16


def test_bf16_without_native_support_is_not_oneDNN_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr("lstmopt.rewrite.swap.native.load", lambda: False)
    ref, packed = lstm_pair()
    with pytest.raises(UnsupportedError, match="no native bf16"):  # (tests/test_low_precision.py: native bf16)
        optimize(ref, dtype=torch.bfloat16)
    # a module that already is bf16 stays stock rather than running emulated bf16
    packed.bfloat16()
    assert packed.packed_dtype is None


@pytest.mark.parametrize("kernel, sequence_kernel", [("onednn", "onednn"), ("cell", "stock"), ("native", "native"),
                                                     ("stock", "stock")])
def test_under_fake_tensor_mode_every_kernel_does_what_nn_lstm_does(kernel, sequence_kernel):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.rnn import pack_sequence

    from conftest import NATIVE

    if kernel == "native" and not NATIVE:
        pytest.skip("native kernel unavailable")
    ref, packed = lstm_pair(input_size=8, hidden_size=16, num_layers=2)
    packed.use_kernel(kernel, sequence_kernel=sequence_kernel)
    sequence = pack_sequence([torch.randn(3, 8), torch.randn(2, 8)])

    def outcome(module, make):
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                out, (h, c) = module(*make())
            return [tuple(t.shape) for t in (out if isinstance(out, torch.Tensor) else out.data, h, c)]
        except Exception as exc:  # nn.LSTM cannot run a PackedSequence on fake tensors either
            return type(exc).__name__

    for make in (lambda: (torch.randn(1, 2, 8),), lambda: (torch.randn(1, 8),), lambda: (sequence,)):
        assert outcome(packed, make) == outcome(ref, make)
