"""What a module's output is: the tensor to measure, its batch dimension and its unit dimension."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_watch.capture import CaptureEngine
from lightning_watch.outputs import batch_dim, batch_first, batch_size, is_measurable, primary_tensor, unit_dim

N, L, F = 3, 5, 4  # batch, sequence length, features


def _seq(batch_first_layout: bool) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(N, L, F) if batch_first_layout else torch.randn(L, N, F)


@pytest.mark.parametrize("layout", [False, True])
def test_lstm_output_and_batch_dimension_follow_batch_first(layout):
    lstm = nn.LSTM(F, 6, batch_first=layout)
    out = lstm(_seq(layout))
    assert primary_tensor(out) is out[0]  # the sequence output, not (h, c)
    assert batch_first(lstm) is layout
    assert batch_dim(lstm, out) == (0 if layout else 1)
    assert batch_size(lstm, out) == N
    assert unit_dim(lstm, out[0]) == 2  # hidden features are last either way


def test_packed_sequence_has_no_batch_dimension_but_a_batch_size():
    lstm = nn.LSTM(F, 6, batch_first=True)
    packed = pack_padded_sequence(_seq(True), torch.tensor([5, 3, 2]), batch_first=True)
    out = lstm(packed)
    tensor = primary_tensor(out)
    assert tensor is out[0].data and tensor.shape == (5 + 3 + 2, 6)
    assert batch_dim(lstm, out) is None
    assert batch_size(lstm, out) == N


@pytest.mark.parametrize("layout", [False, True])
def test_multihead_attention_returns_its_attention_output(layout):
    attn = nn.MultiheadAttention(F, 2, batch_first=layout)
    x = _seq(layout)
    out = attn(x, x, x)
    assert primary_tensor(out) is out[0]
    assert batch_dim(attn, out) == (0 if layout else 1)
    assert batch_size(attn, out) == N


@pytest.mark.parametrize("layout", [False, True])
def test_transformer_layers_read_batch_first_from_their_attention(layout):
    layer = nn.TransformerEncoderLayer(F, 2, dim_feedforward=8, batch_first=layout)
    encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    assert batch_first(layer) is layout and batch_first(encoder) is layout
    assert batch_size(encoder, encoder(_seq(layout))) == N


def test_primary_tensor_of_odd_outputs():
    t = torch.ones(2, 3)
    assert primary_tensor(t) is t
    assert primary_tensor([t, torch.zeros(1)]) is t
    assert primary_tensor(((t,),)) is t
    assert primary_tensor({"aux": None, "logits": t}) is t  # first *tensor* value
    assert primary_tensor({"a": 1, "b": "x"}) is None
    assert primary_tensor(None) is None
    assert primary_tensor(()) is None
    assert primary_tensor("text") is None
    deep = t
    for _ in range(20):  # absurdly deep nesting gives up instead of recursing forever
        deep = (deep,)
    assert primary_tensor(deep) is None
    ints = torch.arange(4)
    assert primary_tensor(ints) is ints  # returned: the caller decides it cannot be measured


@pytest.mark.parametrize(
    ("tensor", "measurable"),
    [
        (torch.ones(2), True),
        (torch.ones(2, dtype=torch.bfloat16), True),
        (torch.ones(2, dtype=torch.float16), True),
        (torch.ones(2, dtype=torch.long), False),
        (torch.ones(2, dtype=torch.bool), False),
        (torch.ones(2, dtype=torch.complex64), True),
        (torch.ones(0, 3), False),
    ],
)
def test_is_measurable(tensor, measurable):
    assert is_measurable(tensor) is measurable


def test_unit_dimension_of_layers():
    assert unit_dim(nn.Conv2d(2, 3, 1), torch.zeros(N, 3, 6, 6)) == 1  # channels
    assert unit_dim(nn.Conv1d(2, 3, 1), torch.zeros(N, 3, 7)) == 1
    assert unit_dim(nn.BatchNorm1d(3), torch.zeros(N, 3, 7)) == 1
    assert unit_dim(nn.BatchNorm1d(3), torch.zeros(N, 3)) == 1
    assert unit_dim(nn.Linear(4, 6), torch.zeros(N, L, 6)) == 2  # features last
    assert unit_dim(nn.Linear(4, 6), torch.zeros(N, 6)) == 1
    assert unit_dim(nn.ReLU(), torch.zeros(6)) == -1  # unbatched


def test_an_activation_takes_the_layout_of_its_producer():
    relu = nn.ReLU()
    assert unit_dim(relu, torch.zeros(N, 3, 7), producer=nn.Conv1d(2, 3, 1)) == 1
    assert unit_dim(relu, torch.zeros(N, L, 6), producer=nn.Linear(4, 6)) == 2
    assert unit_dim(relu, torch.zeros(N, 3, 7), producer=None) == 2


class Mixed(nn.Module):
    """Activations registered before their layer, after it, and in a Sequential."""

    def __init__(self):
        super().__init__()
        self.early = nn.ReLU()  # registered first, applied after `conv`
        self.conv = nn.Conv1d(2, 3, 3)
        self.after_conv = nn.ReLU()
        self.fc = nn.Linear(7, 6)
        self.after_fc = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x1, x2, x3):
        return self.early(self.conv(x1)), self.after_conv(self.conv(x1)), self.after_fc(self.fc(x2)), self.block(x3)


def test_engine_measures_units_along_the_producers_layout():
    class Collect:
        def __init__(self):
            self.units = {}

        def consume(self, index, captured):
            self.units[captured.info.name] = captured.alive().shape[0]

    model = Mixed()
    engine = CaptureEngine.for_model(model)
    sub = Collect()
    engine.subscribe(sub, [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)])
    engine.arm(sub)
    model(torch.randn(N, 2, 9), torch.randn(N, L, 7), torch.randn(N, 2, 5, 5))
    engine.unsubscribe(sub)
    # conv outputs (N, 3, 7): 3 channels; linear outputs (N, L, 6): 6 features; conv2d block: 4 channels
    assert sub.units == {"early": 3, "after_conv": 3, "after_fc": 6, "block.2": 4}
    assert engine.hook_count == 0
