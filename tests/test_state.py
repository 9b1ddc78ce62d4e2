"""State: the nn.LSTM state_dict contract, packs that follow every weight change, copies and pickles."""

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

from conftest import assert_same_result, counting_kernels, lstm_pair, needs_bf16, run_python_json
from lstmopt import PackedLSTM
from lstmopt.modules.guards import kernel_accepts
from lstmopt.modules.lstm import KERNELS

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=3, bias=False, batch_first=True)]


def check_equal(ref, packed, *, batch_first=False, packed_kernel=True):
    """``packed`` gives ``ref``'s exact result, served by the packed kernel (unless ``packed_kernel=False``);
    returns what each fast path did (see ``conftest.KernelCalls``), repacks included."""
    dtype = ref.weight_ih_l0.dtype
    x = torch.randn(3, 6, ref.input_size, dtype=dtype) if batch_first else torch.randn(6, 3, ref.input_size, dtype=dtype)
    with torch.no_grad(), counting_kernels() as calls:
        assert_same_result(ref(x), packed(x))
    assert calls["onednn"] == (len(packed.packed_layers) if packed_kernel else 0), dict(calls)
    return calls


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_has_exactly_the_nn_lstm_keys_and_shapes(config):
    ref, packed = lstm_pair(**config)
    expected = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in packed.state_dict().items()} == expected
    assert [n for n, _ in packed.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("config", CONFIGS)
def test_checkpoints_load_both_ways(config):
    ref, packed = lstm_pair(**config)
    fresh_ref = nn.LSTM(12, 20, **config).eval()
    fresh_ref.load_state_dict(packed.state_dict())
    check_equal(fresh_ref, packed, batch_first=ref.batch_first)
    fresh_packed = PackedLSTM(12, 20, **config).eval()
    fresh_packed.load_state_dict(ref.state_dict())
    check_equal(ref, fresh_packed, batch_first=ref.batch_first)


def test_load_state_dict_repacks():
    ref, packed = lstm_pair(num_layers=2)
    other, _ = lstm_pair(num_layers=2, seed=7)
    with counting_kernels() as calls:
        packed.load_state_dict(other.state_dict())
    assert calls["repack"] == 1
    assert check_equal(other, packed)["repack"] == 0  # packed already: the call finds them current


def test_load_state_dict_with_assign_repacks():
    _, packed = lstm_pair(num_layers=2)
    other, _ = lstm_pair(num_layers=2, seed=7)
    with counting_kernels() as calls:
        packed.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    assert calls["repack"] == 1  # once, at the end, not once per assigned parameter
    check_equal(other, packed)
    assert all(w is getattr(packed, n) for w, n in zip(packed._flat_weights, packed._flat_weights_names))


def test_in_place_edit_of_a_weight_takes_effect():
    ref, packed = lstm_pair(bidirectional=True)
    with torch.no_grad():
        for m in (ref, packed):
            m.weight_hh_l0_reverse.mul_(1.5)
            m.bias_ih_l0[:5] = 0.25
    assert check_equal(ref, packed)["repack"] == 1  # noticed by the call, which packed again first


def test_data_assignment_takes_effect():
    ref, packed = lstm_pair()
    new = torch.randn_like(ref.weight_ih_l0)
    ref.weight_ih_l0.data = new.clone()
    packed.weight_ih_l0.data = new.clone()
    assert check_equal(ref, packed)["repack"] == 1  # .data = moves the data without a version bump


def test_reassigning_a_parameter_takes_effect_and_keeps_flat_weights_coherent():
    ref, packed = lstm_pair()
    new = torch.randn_like(ref.weight_hh_l0)
    ref.weight_hh_l0 = nn.Parameter(new.clone())
    with counting_kernels() as calls:
        packed.weight_hh_l0 = nn.Parameter(new.clone())
    assert calls["repack"] == 1 and packed._flat_weights[1] is packed.weight_hh_l0
    check_equal(ref, packed)


def test_functional_call_uses_the_given_weights():
    ref, packed = lstm_pair()
    params = {k: torch.randn_like(v) for k, v in ref.named_parameters()}
    x = torch.randn(6, 3, 12)
    with torch.no_grad():
        expected = torch.func.functional_call(ref, params, (x,))
        assert_same_result(expected, torch.func.functional_call(packed, params, (x,)))
        assert_same_result(ref(x), packed(x))  # and the module's own weights afterwards


def test_to_float64_and_back_repacks():
    ref, packed = lstm_pair(num_layers=2)
    packed.double()
    assert packed.packed_dtype is None
    check_equal(ref.double(), packed, packed_kernel=False)
    packed.float()
    assert packed.packed_dtype == torch.float32
    check_equal(ref.float(), packed)
    assert all(w is getattr(packed, n) for w, n in zip(packed._flat_weights, packed._flat_weights_names))


@needs_bf16
def test_bfloat16_conversion_repacks_in_bf16():
    ref, packed = lstm_pair(num_layers=2, bidirectional=True)
    packed.bfloat16()
    ref.bfloat16()
    assert packed.packed_dtype == torch.bfloat16
    x = torch.randn(6, 3, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_same_result(ref(x), packed(x))


def test_packs_are_opaque_onednn_tensors_made_outside_autograd():
    _, packed = lstm_pair(num_layers=2, bidirectional=True)
    for layer in packed.packed_layers:
        assert layer.packs.packed_ih.is_mkldnn and layer.packs.packed_hh.is_mkldnn
        assert layer.packs.packed_ih.grad_fn is None and layer.packs.packed_hh.grad_fn is None


def test_an_optimizer_step_is_seen_by_the_next_call():
    ref, packed = lstm_pair()
    optimizer = torch.optim.SGD(packed.parameters(), lr=0.1)
    packed.train()
    packed(torch.randn(4, 2, 12))[0].sum().backward()
    optimizer.step()
    packed.eval()
    trained = torch.nn.LSTM(12, 20).eval()
    trained.load_state_dict(packed.state_dict())
    assert check_equal(trained, packed)["repack"] == 1
    assert not torch.equal(trained.weight_ih_l0, ref.weight_ih_l0)


@pytest.mark.parametrize("config", CONFIGS)
def test_deepcopy_is_independent_and_equal(config):
    ref, packed = lstm_pair(**config)
    clone = copy.deepcopy(packed)
    check_equal(ref, clone, batch_first=ref.batch_first)
    with torch.no_grad():
        clone.weight_ih_l0.zero_()
    check_equal(ref, packed, batch_first=ref.batch_first)


@pytest.mark.parametrize("config", CONFIGS)
def test_pickle_and_torch_save_round_trip(config):
    ref, packed = lstm_pair(**config)
    restored = pickle.loads(pickle.dumps(packed))
    check_equal(ref, restored, batch_first=ref.batch_first)
    buf = io.BytesIO()
    torch.save(packed, buf)
    buf.seek(0)
    check_equal(ref, torch.load(buf, weights_only=False), batch_first=ref.batch_first)


def test_saved_module_stores_the_dense_weights_once():
    _, packed = lstm_pair(input_size=256, hidden_size=256, num_layers=2)
    buf = io.BytesIO()
    torch.save(packed, buf)
    weight_bytes = sum(p.numel() * p.element_size() for p in packed.parameters())
    assert weight_bytes < buf.tell() < 1.1 * weight_bytes


def test_pickled_module_repacks_in_a_fresh_process(tmp_path):
    ref, packed = lstm_pair(num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 12)
    with torch.no_grad():  # with autograd on, eager runs oneDNN's training primitive: other last bits
        expected = ref(x)[0]
    torch.save({"module": packed, "x": x, "expected": expected}, tmp_path / "m.pt")
    result = run_python_json(f"""
        import json, torch
        blob = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
        m = blob["module"]
        with torch.no_grad():
            out = m(blob["x"])[0]
        print(json.dumps({{"equal": torch.equal(out, blob["expected"]),
                           "packed": all(l.is_packed() for l in m.packed_layers)}}))
    """)
    assert result == {"equal": True, "packed": True}


def test_concurrent_forward_calls_match_serial_calls():
    ref, packed = lstm_pair(input_size=40, hidden_size=64, num_layers=2, bidirectional=True)
    inputs = [torch.randn(t, b, 40) for t, b in [(1, 1), (9, 4), (30, 2), (5, 8)] * 4]
    with torch.no_grad():
        expected = [ref(x) for x in inputs]
    results = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def work(i):
        start.wait()
        with torch.no_grad():
            for _ in range(10):
                results[i] = packed(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, a in zip(expected, results):
        assert_same_result(e, a)


@pytest.mark.parametrize("kernel", KERNELS)
def test_weights_replaced_with_other_shapes_never_reach_a_kernel(kernel):
    _, packed = lstm_pair()
    packed.use_kernel(kernel, sequence_kernel="native" if kernel == "native" else None)
    packed.weight_hh_l0.data = torch.randn(80, 7)  # a kernel would read out of bounds
    x = torch.randn(3 if kernel != "cell" else 1, 2, 12)
    with torch.no_grad():
        packed._state.ready(packed, lambda: True)  # what the next call does: notice the change, repack
    # Every kernel is off: calls take nn.LSTM's own path, with whatever it makes of such weights.
    assert packed.packed_dtype is None and packed.kernel_dtype is None and packed.sequence_dtype is None
    assert not kernel_accepts(packed, x, None, packed.kernel_dtype) and not packed.uses_native_kernel


RELOAD_KERNELS = [(k, None) for k in KERNELS] + [(None, s) for s in ("stock", "onednn", "native")]


@pytest.mark.parametrize("kernel, sequence_kernel", RELOAD_KERNELS,
                         ids=[k or f"sequences-{s}" for k, s in RELOAD_KERNELS])
def test_a_call_during_load_state_dict_sees_the_old_or_the_new_weights_whole(kernel, sequence_kernel):
    from conftest import NATIVE
    from torch.nn.utils.rnn import pack_sequence

    if "native" in (kernel, sequence_kernel) and not NATIVE:
        pytest.skip("native kernel unavailable")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread: every call is deterministic, whatever runs beside it
    try:
        _, packed = lstm_pair(input_size=64, hidden_size=256, num_layers=2)
        packed.use_kernel(kernel, sequence_kernel=sequence_kernel)
        old = {k: v.clone() for k, v in packed.state_dict().items()}
        new = {k: torch.randn_like(v) for k, v in old.items()}
        if sequence_kernel is None:
            x = torch.randn(1 if kernel == "cell" else 3, 2, 64)
        else:
            x = pack_sequence([torch.randn(4, 64), torch.randn(2, 64)])
        outputs = {}
        for name, weights in (("old", old), ("new", new)):
            packed.load_state_dict(weights)
            with torch.no_grad():
                outputs[name] = packed(x)[1][1]  # the last cell state depends on every weight
        packed.load_state_dict(old)
        mixed, done = [], threading.Event()

        def call():
            torch.set_num_threads(1)  # OpenMP's thread count is per thread
            with torch.no_grad():
                while not done.is_set():
                    c = packed(x)[1][1]
                    if not (torch.equal(c, outputs["old"]) or torch.equal(c, outputs["new"])):
                        mixed.append(c)

        callers = [threading.Thread(target=call) for _ in range(4)]
        for t in callers:
            t.start()
        for i in range(300):
            packed.load_state_dict(new if i % 2 == 0 else old)
        done.set()
        for t in callers:
            t.join()
        assert not mixed, f"{len(mixed)} calls saw a mix of old and new weights"
    finally:
        torch.set_num_threads(threads_before)
