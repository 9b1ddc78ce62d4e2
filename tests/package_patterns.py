"""Models written the way public packages write them, each a pattern that broke lstmopt on real code:

- a forecaster that takes and returns dataclasses (darts' ``PLModuleInput``/``PLModuleOutput``), with an Enum
  field in its batch;
- a LightningModule with torchmetrics' ``MetricCollection`` its forward never calls (darts keeps empty ones);
- a character language model whose class pickles itself its own way, rebuilding stock ``nn.LSTM``s from its
  constructor arguments (flair's ``LanguageModel.__setstate__``), and whose forward takes integer ids and a
  state tuple;
- outputs that are named tuples, or hold ``None``;
- models quantized by ``torch.ao.quantization.quantize_dynamic``.
"""

import dataclasses
import enum
from typing import NamedTuple, Optional

import torch
from torch import nn


class Stage(enum.Enum):
    PREDICT = "predict"
    TRAIN = "train"


@dataclasses.dataclass
class Batch:
    past_target: torch.Tensor
    past_covariates: Optional[torch.Tensor] = None
    stage: Stage = Stage.PREDICT


@dataclasses.dataclass
class Forecast:
    prediction: torch.Tensor
    state: Optional[torch.Tensor] = None


class DataclassForecaster(nn.Module):
    """Takes a ``Batch``, returns a ``Forecast``."""

    def __init__(self, features: int = 3, hidden: int = 16, horizon: int = 4):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, batch: Batch) -> Forecast:
        x = batch.past_target if batch.past_covariates is None else torch.cat([batch.past_target,
                                                                                batch.past_covariates], dim=2)
        out, (h, _) = self.lstm(x)
        return Forecast(self.head(out[:, -1]), None)


class TensorInForecaster(nn.Module):
    """Takes a tensor, returns a ``Forecast`` whose ``state`` is None: what a trace cannot return as it is."""

    def __init__(self, features: int = 3, hidden: int = 16, horizon: int = 4):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x, **options) -> Forecast:  # **options: not scriptable
        out, _ = self.lstm(x)
        return Forecast(self.head(out[:, -1]), None)


class Scores(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor
    steps: int


class NamedTupleTagger(nn.Module):
    def __init__(self, vocab: int = 30, hidden: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.lstm = nn.LSTM(8, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, 5)

    def forward(self, ids, **options):
        out, (h, _) = self.lstm(self.embed(ids))
        return Scores(self.out(out), h, 7)


def build_lightning_with_metrics():
    """A LightningModule holding empty torchmetrics collections, as darts' modules do: scripting compiles them
    (and fails on them) though forward never calls them."""
    import lightning.pytorch as pl
    import torchmetrics

    class WithMetrics(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 16, batch_first=True)
            self.head = nn.Linear(16, 1)
            self.train_metrics = torchmetrics.MetricCollection([])
            self.val_metrics = torchmetrics.MetricCollection([])

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.head(y)

    torch.manual_seed(0)
    return _module_level(WithMetrics)()


def _module_level(cls):
    """Give a class defined in a function a module-level name, so that pickles and TorchScript find it."""
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls
    return cls


class CharLanguageModel(nn.Module):
    """flair's ``LanguageModel`` in miniature: ids (time, batch) and a state tuple in, its pickling rebuilds
    the model from constructor arguments (so a pickle of it holds stock ``nn.LSTM``s again)."""

    def __init__(self, vocab: int = 31, embedding: int = 16, hidden: int = 32, layers: int = 1):
        super().__init__()
        self.args = (vocab, embedding, hidden, layers)
        self.encoder = nn.Embedding(vocab, embedding)
        self.rnn = nn.LSTM(embedding, hidden, layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, ids, hidden):
        output, hidden = self.rnn(self.encoder(ids), hidden)
        return self.decoder(output), output, hidden

    def __getstate__(self):
        return {"state_dict": self.state_dict(), "args": self.args}

    def __setstate__(self, state):
        model = CharLanguageModel(*state["args"])
        model.load_state_dict(state["state_dict"])
        self.__dict__.update(model.__dict__)


def build_char_language_model() -> CharLanguageModel:
    torch.manual_seed(0)
    return CharLanguageModel().eval()


def char_language_model_inputs():
    """What its users feed it: character ids and the state, at two batch sizes."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 31, (t, b), generator=g), (torch.zeros(1, b, 32), torch.zeros(1, b, 32)))
            for t, b in [(20, 3), (9, 1)]]


def build_dataclass_forecaster() -> DataclassForecaster:
    torch.manual_seed(0)
    return DataclassForecaster().eval()


def dataclass_batches():
    g = torch.Generator().manual_seed(2)
    return [(Batch(torch.randn(b, t, 3, generator=g)),) for b, t in [(4, 12), (1, 5)]]


def build_tensor_in_forecaster() -> TensorInForecaster:
    torch.manual_seed(0)
    return TensorInForecaster().eval()


def build_named_tuple_tagger() -> NamedTupleTagger:
    torch.manual_seed(0)
    return NamedTupleTagger().eval()


class QuantizableTagger(nn.Module):
    """Every recurrent kind torch.ao quantizes dynamically."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(32, 12, batch_first=True)
        self.lstm_cell = nn.LSTMCell(12, 10)
        self.gru_cell = nn.GRUCell(12, 10)
        self.out = nn.Linear(20, 4)

    def forward(self, x):
        y, _ = self.lstm(x)
        z, _ = self.gru(y)
        h, _ = self.lstm_cell(z[:, -1])
        g = self.gru_cell(z[:, -1])
        return self.out(torch.cat([h, g], dim=1))


def build_quantized_tagger(dtype: str = "qint8"):
    torch.manual_seed(0)
    model = QuantizableTagger().eval()
    return torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.Linear},
                                                  dtype=getattr(torch, dtype))
