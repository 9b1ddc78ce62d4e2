"""The computations: ATen's oneDNN LSTM op and cell op on packed weights (``aten``), lstmopt's native
library (``native``, built by ``build`` from ``csrc/lstm.cpp``), and the staleness checks packs share
(``tensor_versions``). Nothing here knows about modules, files or the CLI."""
