"""Property: a PackedLSTM computes exactly what nn.LSTM computes, for any configuration and input."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_same_result, lstm_pair

# Sizes straddle oneDNN's 32-wide gate blocks (H not a multiple of 32 pads each gate).
sizes = st.sampled_from([1, 3, 16, 31, 32, 33, 64, 70])


@st.composite
def lstm_cases(draw):
    config = dict(
        input_size=draw(sizes), hidden_size=draw(sizes), num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()), bias=draw(st.booleans()), batch_first=draw(st.booleans()),
    )
    steps = draw(st.sampled_from([1, 2, 7, 25]))
    batch = draw(st.sampled_from([1, 2, 5]))
    unbatched = draw(st.booleans())
    with_state = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return config, steps, batch, unbatched, with_state, seed


def make_inputs(config, steps, batch, unbatched, with_state, seed):
    g = torch.Generator().manual_seed(seed)
    if unbatched:
        x = torch.randn(steps, config["input_size"], generator=g)
    elif config["batch_first"]:
        x = torch.randn(batch, steps, config["input_size"], generator=g)
    else:
        x = torch.randn(steps, batch, config["input_size"], generator=g)
    if not with_state:
        return x, None
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    shape = (states, config["hidden_size"]) if unbatched else (states, batch, config["hidden_size"])
    return x, (torch.randn(shape, generator=g), torch.randn(shape, generator=g))


@settings(max_examples=120, deadline=None)
@given(lstm_cases())
def test_packed_lstm_equals_nn_lstm(case):
    config, *shape, seed = case
    ref, packed = lstm_pair(seed=seed, **config)
    x, hx = make_inputs(config, *shape, seed)
    with torch.no_grad():
        assert_same_result(ref(x, hx), packed(x, hx))


@settings(max_examples=25, deadline=None)
@given(lstm_cases())
def test_one_pack_serves_every_batch_and_length(case):
    config, _, _, _, with_state, seed = case
    ref, packed = lstm_pair(seed=seed, **config)
    with torch.no_grad():
        for steps, batch in [(1, 1), (9, 4), (3, 7), (30, 2)]:
            x, hx = make_inputs(config, steps, batch, False, with_state, seed + steps)
            assert_same_result(ref(x, hx), packed(x, hx))
