"""Parametrized, tied and shared parameters: leaves read, never the parametrization; true norms, counted once."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import all_hook_count, fit_bare_and_watched, last, make_trainer
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import Watch, WatchWarning
from lightning_watch.monitors import DeadUnitMonitor
from lightning_watch.monitors.params import ParameterTable


def loader(n: int = 64, features: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    return DataLoader(TensorDataset(x, x[:, :1] - x[:, 1:2]), batch_size=8)


class Parametrized(pl.LightningModule):
    """One layer per kind of parametrization, new and legacy."""

    def __init__(self) -> None:
        super().__init__()
        self.sn = parametrizations.spectral_norm(nn.Linear(6, 6))
        self.wn = parametrizations.weight_norm(nn.Linear(6, 6))
        self.orth = parametrizations.orthogonal(nn.Linear(6, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the legacy weight_norm
            self.old_wn = nn.utils.weight_norm(nn.Linear(6, 6))
        self.old_sn = nn.utils.spectral_norm(nn.Linear(6, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in (self.sn, self.wn, self.orth, self.old_wn):
            x = self.act(layer(x))
        return self.old_sn(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_parametrized_layers_train_bitwise_identically_and_report_their_leaves(tmp_path):
    bare, rec, scalars, model, caught = fit_bare_and_watched(
        tmp_path, Parametrized, loader, lambda: Watch(log_every_n_steps=2, alerts=False, pictures=False), max_steps=8
    )
    assert rec.losses == bare.losses  # reading module.weight would have run the power iteration
    torch_warnings = [str(w.message) for w in caught if not issubclass(w.category, WatchWarning)]
    assert not [m for m in torch_warnings if "non-leaf" in m or ".grad" in m], torch_warnings
    ours = [str(w.message) for w in caught if issubclass(w.category, WatchWarning)]
    # dead units cannot be read off a spectral-norm or orthogonal leaf: said once per kind, never silent
    assert len(ours) == 3 and all("DeadUnitMonitor skips" in m for m in ours), ours
    # parametrized layers are reported under their own names, never as `<layer>.parametrizations.weight`
    assert not [t for t in scalars if "parametrizations" in t]
    leaves = {
        "sn": ["sn.parametrizations.weight.original", "sn.bias"],
        "wn": ["wn.parametrizations.weight.original0", "wn.parametrizations.weight.original1", "wn.bias"],
        "orth": ["orth.parametrizations.weight.original", "orth.bias"],
        "old_wn": ["old_wn.weight_g", "old_wn.weight_v", "old_wn.bias"],
        "old_sn": ["old_sn.weight_orig", "old_sn.bias"],
    }
    for module, names in leaves.items():
        for step, value in scalars[f"watch/grad_norm/{module}"]:
            assert value == pytest.approx(rec.grad(step, names), rel=1e-5), module
        step, value = last(scalars, f"watch/param_norm/{module}")
        assert value == pytest.approx(rec.weight(step, names), rel=1e-5), module
        step, value = last(scalars, f"watch/update_norm/{module}")
        assert value == pytest.approx(rec.update(step, names), rel=1e-4), module
    assert "watch/dead_frac/wn" in scalars and "watch/dead_frac/old_wn" in scalars
    assert "watch/dead_frac/sn" not in scalars
    assert all_hook_count(model) == all_hook_count(Parametrized())  # the legacy layers' own hooks only


class DeadWeightNorm(pl.LightningModule):
    """A weight-normalized layer two of whose six units never fire (bias -100)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = parametrizations.weight_norm(nn.Linear(6, 6))
        with torch.no_grad():
            self.fc.bias[:2] = -100.0
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_dead_units_of_a_weight_normalized_layer_come_from_its_leaf(tmp_path):
    torch.manual_seed(0)
    monitor = DeadUnitMonitor(log_every_n_steps=4, include=["fc"])
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DeadWeightNorm(), loader())
    assert not [w for w in caught if "non-leaf" in str(w.message)]
    assert monitor.last_snapshot.get("dead_frac", "fc") == pytest.approx(2 / 6)


# ---------------------------------------------------------------------------- tied and shared
class TiedLM(pl.LightningModule):
    """GPT-2's shape in miniature: ``lm_head.weight is embed.weight``; ``block`` is called twice."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))  # one module, two calls
        return self.lm_head(self.norm(h))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def token_loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 11, (48, 9), generator=g)), batch_size=8)


def test_a_tied_weight_is_reported_under_each_holder_with_its_true_norm_and_counted_once(tmp_path):
    bare, rec, scalars, _, _ = fit_bare_and_watched(
        tmp_path, TiedLM, token_loader, lambda: Watch(log_every_n_steps=3, alerts=False, pictures=False), max_steps=6
    )
    assert rec.losses == bare.losses
    tied = ["embed.weight"]  # named_parameters() lists the shared tensor once, under its first name
    for holder in ("embed", "lm_head"):
        for step, value in scalars[f"watch/grad_norm/{holder}"]:
            assert value == pytest.approx(rec.grad(step, tied), rel=1e-5), holder
        step, value = last(scalars, f"watch/param_norm/{holder}")
        assert value == pytest.approx(rec.weight(step, tied), rel=1e-5), holder
        step, value = last(scalars, f"watch/update_norm/{holder}")
        assert value == pytest.approx(rec.update(step, tied), rel=1e-4), holder
    everything = list(rec.grads[2])
    assert len(everything) == 5  # embed.weight (tied, once), block.{weight,bias}, norm.{weight,bias}
    for step, value in scalars["watch/global/grad_norm"]:
        assert value == pytest.approx(rec.grad(step, everything), rel=1e-5)  # counted once
    step, value = last(scalars, "watch/global/update_ratio")
    assert value == pytest.approx(rec.update(step, everything) / rec.weight(step, everything), rel=1e-4)
    for step, value in scalars["watch/grad_norm/block"]:  # a module called twice: its one gradient
        assert value == pytest.approx(rec.grad(step, ["block.weight", "block.bias"]), rel=1e-5)


def test_parameter_table_lists_shared_parameters():
    model = TiedLM()
    table = ParameterTable([(n, m) for n, m in model.named_modules() if n])
    assert table.shared() == {"embed.weight": ["embed", "lm_head"]}
    assert len(table.trainable()) == len(list(model.parameters()))


def test_per_module_sums_of_parameter_norms_match_a_direct_computation():
    torch.manual_seed(3)
    first, empty, last_layer, outside = nn.Linear(4, 3), nn.ReLU(), nn.Linear(2, 5), nn.Linear(2, 2)
    table = ParameterTable([("first", first), ("empty", empty), ("last", last_layer)])
    params = [first.weight, first.bias, last_layer.weight, outside.weight, last_layer.bias]
    norms = torch._foreach_norm([p.detach() for p in params], 2)
    rows = torch.stack(list(norms)).square().view(1, -1)
    got = table.per_module(params, rows, torch.device("cpu"))[0].sqrt()

    def norm(*tensors):
        return torch.cat([t.detach().reshape(-1) for t in tensors]).norm().item()

    expected = [norm(first.weight, first.bias), 0.0, norm(last_layer.weight, last_layer.bias), norm(outside.weight)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)  # the last column: parameters outside the table
    counts = table.grouping(params, torch.device("cpu")).counts
    assert counts.tolist() == [2.0, 0.0, 2.0, 1.0]


def test_per_module_counts_a_tied_parameter_under_each_holder():
    encoder, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = encoder.weight
    table = ParameterTable([("encoder", encoder), ("head", head)])
    rows = torch.tensor([[4.0], [1.0]])  # two per-parameter quantities of the one shared weight
    got = table.per_module([encoder.weight], rows, torch.device("cpu"))
    assert got.tolist() == [[4.0, 4.0, 0.0], [1.0, 1.0, 0.0]]
    assert table.grouping([encoder.weight], torch.device("cpu")).counts.tolist() == [1.0, 1.0, 0.0]
