"""The modules lstmopt swaps in and what they run.

- ``lstm``: ``PackedLSTM`` (nn.LSTM, LSTMP, subclasses); ``gru``: ``PackedGRU``; ``rnn``: ``PackedRNN``
  (``one_state``: what these two share); ``cell``: ``PackedLSTMCell`` and ``PackedGRUCell``; ``subclasses``:
  where pickles find packed subclasses of users' nn.LSTM subclasses.
- ``dispatch``: how a call in Python reaches a kernel; ``scripted``: what a scripted module runs instead.
- ``guards``: the checks that keep bad input from the kernels.
- ``packs``: oneDNN's packs of a layer and direction; ``pack_state``: how a module's packs follow its weights.
"""
