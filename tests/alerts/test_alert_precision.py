"""Precision of existing rules and checks (issue 13): each fix with a sick and a healthy case."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, TensorDataset

from lightning_watch import Watch
from lightning_watch.alerts.checks import LabelRunCheck, batch_labels, check_batch_mixing, check_sampler
from lightning_watch.alerts.rules import RuleContext, loss_divergence, update_size
from lightning_watch.snapshot import Snapshot


# ---------------------------------------------------------------------- saturation: ReLU6 is a rectifier
class _Act(pl.LightningModule):
    def __init__(self, act: nn.Module, gain: float, bias: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 2))
        with torch.no_grad():
            self.net[0].weight.mul_(gain)
            self.net[0].bias.fill_(bias)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit(tmp_path, module, data, steps=60, **trainer_kw):
    watch = Watch(report=False, pictures=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=[watch],
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=False,
        **trainer_kw,
    )
    trainer.fit(module, data)
    return watch.alerts


def _data(n=640, features=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32, shuffle=True)


def test_relu6_zeros_are_not_saturation(tmp_path):
    torch.manual_seed(0)
    module = _Act(nn.ReLU6(), gain=1.0, bias=-0.4)
    with torch.no_grad():  # independent measure: most of the ReLU6's outputs are exactly 0 (its lower bound)
        h = module.net[1](module.net[0](torch.randn(512, 8)))
        assert (h == 0).float().mean() > 0.6
    alerts = _fit(tmp_path, module, _data())
    assert "saturated_units" not in {a.code for a in alerts}


def test_hardtanh_saturation_is_still_seen(tmp_path):
    torch.manual_seed(0)
    module = _Act(nn.Hardtanh(), gain=50.0, bias=0.0)  # pre-activations far beyond +-1
    alerts = _fit(tmp_path, module, _data())
    assert "saturated_units" in {a.code for a in alerts}


# ---------------------------------------------------------------------- batch mixing: find the batch dim
class TimeMajorLM(nn.Module):
    """A word-level LM on (seq, batch) token ids, as in PyTorch's word_language_model example."""

    def __init__(self, vocab=20, flatten=False):
        super().__init__()
        self.flatten = flatten
        self.emb = nn.Embedding(vocab, 8)
        self.rnn = nn.LSTM(8, 16)  # batch_first=False: time-major, as the data are
        self.out = nn.Linear(16, vocab)

    def forward(self, ids):  # (T, N) -> (T, N, V), or (T * N, V) when flattened
        logits = self.out(self.rnn(self.emb(ids))[0])
        return logits.reshape(-1, logits.shape[-1]) if self.flatten else logits


@pytest.mark.parametrize("flatten", [False, True])
def test_time_major_language_model_is_not_batch_mixing(flatten):
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (12, 5))  # (seq, batch)
    targets = torch.randint(0, 20, (12 * 5,))
    model = TimeMajorLM(flatten=flatten)
    with torch.no_grad():  # independent check: the LSTM runs along dim 0 (time), so dim 0 "mixes" ...
        changed = ids.clone()
        changed[0] = (changed[0] + 1) % 20
        out, ref = model(changed), model(ids)
        if flatten:
            out, ref = out.view(12, 5, -1), ref.view(12, 5, -1)
        assert (out[1:] - ref[1:]).abs().max() > 1e-3
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 20  # ... while batch columns stay independent
        out = model(changed) if not flatten else model(changed).view(12, 5, -1)
        assert torch.allclose(out[:, 1:], ref[:, 1:])
    assert check_batch_mixing(RuleContext(), Snapshot(0, 0), model, (ids, targets)) == []


def test_batch_first_mismatch_with_labels_is_batch_mixing():
    torch.manual_seed(0)

    class PerStep(nn.Module):  # (N, T, F) given to batch_first=False: the LSTM runs along the batch
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 8)

        def forward(self, x):
            return self.rnn(x)[0]  # (N, T, 8): every step's output, laid out like the inputs

    x, y = torch.randn(6, 5, 4), torch.randint(0, 2, (6,))  # the labels say: 6 samples, dim 0
    found = check_batch_mixing(RuleContext(), Snapshot(0, 0), PerStep(), (x, y))
    assert [a.code for a in found] == ["batch_mixing"] and found[0].extra["batch_dim"] == 0


class VAE(nn.Module):
    """Samples its latent code in eval mode too (as some example programs do)."""

    def __init__(self, mix=False):
        super().__init__()
        self.mix = mix
        self.enc, self.dec = nn.Linear(10, 2 * 4), nn.Linear(4, 10)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        if self.mix:  # a bug: "normalizes" the code with the batch's mean
            mu = mu - mu.mean(dim=0, keepdim=True)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.dec(z), mu, logvar


def test_stochastic_forward_is_not_batch_mixing():
    torch.manual_seed(0)
    model, x = VAE(), torch.randn(8, 10)
    with torch.no_grad():  # independent check: the forward differs from itself
        assert not torch.allclose(model(x)[0], model(x)[0])
    rng = torch.get_rng_state()
    assert check_batch_mixing(RuleContext(), Snapshot(0, 0), model, (x,)) == []
    assert torch.equal(rng, torch.get_rng_state())


def test_stochastic_forward_that_mixes_is_still_seen():
    torch.manual_seed(0)
    found = check_batch_mixing(RuleContext(), Snapshot(0, 0), VAE(mix=True), (torch.randn(8, 10),))
    assert [a.code for a in found] == ["batch_mixing"]


def test_forward_that_differs_from_itself_is_skipped():
    class Drifting(nn.Module):  # mixes, but also changes with every call: the check cannot tell, says nothing
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x.cumsum(0) + self.calls

    assert check_batch_mixing(RuleContext(), Snapshot(0, 0), Drifting(), torch.randn(5, 3)) == []


# ---------------------------------------------------------------------- unshuffled data: batch samplers
class Buckets(Sampler):
    """A bucketing batch sampler (no `.sampler`, no `shuffle`): shuffles its buckets."""

    def __init__(self, n, size):
        self.n, self.size = n, size

    def __iter__(self):
        order = torch.randperm(self.n).tolist()
        return iter([order[i : i + self.size] for i in range(0, self.n, self.size)])

    def __len__(self):
        return math.ceil(self.n / self.size)


def _ds(n=64):
    return TensorDataset(torch.randn(n, 3), torch.arange(n) % 4)


@pytest.mark.parametrize(
    "batch_sampler, expected",
    [
        (lambda ds: BatchSampler(RandomSampler(ds), 8, False), []),
        (lambda ds: Buckets(len(ds), 8), []),
        (lambda ds: BatchSampler(SequentialSampler(ds), 8, False), ["unshuffled_data"]),
    ],
)
def test_batch_sampler_decides_the_order(batch_sampler, expected):
    ds = _ds()
    loader = DataLoader(ds, batch_sampler=batch_sampler(ds))
    assert isinstance(loader.sampler, SequentialSampler)  # the placeholder that used to raise the alert
    assert [a.code for a in check_sampler(RuleContext(), Snapshot(0, 0), loader)] == expected


def test_plain_loaders_are_judged_as_before():
    ds = _ds()
    assert [a.code for a in check_sampler(RuleContext(), Snapshot(0, 0), DataLoader(ds, batch_size=8))] == [
        "unshuffled_data"
    ]
    assert check_sampler(RuleContext(), Snapshot(0, 0), DataLoader(ds, batch_size=8, shuffle=True)) == []


# ---------------------------------------------------------------------- label runs: (ids, lengths, labels)
def _label_runs(batches):
    check = LabelRunCheck(4)
    for batch in batches:
        check.observe(batch)
    return [a.code for a in check.result(RuleContext(), Snapshot(0, 0))]


def test_lengths_are_not_labels():
    # bucketed by length: one length per batch, labels mixed
    batches = [(torch.randint(1, 9, (8, 10)), torch.full((8,), 3 + b), torch.arange(8) % 4) for b in range(4)]
    assert _label_runs(batches) == []


def test_sorted_labels_after_lengths_are_seen():
    batches = [(torch.randint(1, 9, (8, 10)), torch.randint(2, 10, (8,)), torch.full((8,), b)) for b in range(4)]
    assert _label_runs(batches) == ["unshuffled_data"]


def test_two_element_batches_are_read_as_before():
    assert _label_runs([(torch.randn(8, 3), torch.full((8,), b)) for b in range(4)]) == ["unshuffled_data"]
    assert _label_runs([(torch.randn(8, 3), torch.arange(8) % 2) for b in range(4)]) == []


# ---------------------------------------------------------------------- loss divergence: positive losses only
def _snap(step, loss, low=None):
    s = Snapshot(step, 0)
    s.put("loss", loss)
    s.put("loss_min", loss if low is None else low)
    return s


def _divergence(initial, means, lows=None):
    lows = lows or [None] * len(means)
    snaps = [_snap(49 + 50 * i, m, lo) for i, (m, lo) in enumerate(zip(means, lows))]
    return list(loss_divergence(snaps[-1], RuleContext(history=snaps[:-1], initial_loss=initial)))


def test_loss_divergence_on_a_positive_loss():
    found = _divergence(1.0, [0.5, 0.3, 2.0])
    assert [a.code for a in found] == ["loss_divergence"]
    assert math.isclose(found[0].value, 2.0 / 0.3)
    assert "times its best level" in found[0].message and "farx" not in found[0].message


def test_negative_policy_gradient_loss_is_not_divergence():
    assert _divergence(-0.5, [-3.0, -0.2]) == []  # a rise from -3 to -0.2 is no "x times"
    assert _divergence(0.4, [0.5, -1.0, 1.5], lows=[0.1, -2.0, 0.9]) == []  # once negative, never judged


# ---------------------------------------------------------------------- a Watch reused for a second fit
class _Small(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)  # the loss stays near its initial level


def test_second_fit_does_not_compare_with_the_first_fits_losses(tmp_path):
    torch.manual_seed(0)
    watch = Watch(report=False, pictures=False)
    module = _Small()

    def fit(steps):
        trainer = pl.Trainer(
            default_root_dir=tmp_path, max_steps=steps, callbacks=[watch], log_every_n_steps=10, logger=False,
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, _data())

    fit(8)  # shorter than the 10 steps of the initial loss
    fit(60)
    assert "loss_divergence" not in {a.code for a in watch.alerts}, [a.summary() for a in watch.alerts]


# ---------------------------------------------------------------------- large updates: only while the loss is stuck
def _updates(initial, windows):
    """``update_size`` on windows of ``(update ratio, mean loss)``; the codes it raises on the last one."""
    snaps = []
    for i, (ratio, loss) in enumerate(windows):
        s = Snapshot(49 + 50 * i, 0)
        s.put("update_ratio", ratio)
        s.put("loss", loss)
        snaps.append(s)
    return [a.code for a in update_size(snaps[-1], RuleContext(history=snaps[:-1], initial_loss=initial))]


def test_large_updates_while_the_loss_is_stuck_are_seen():
    # SGD lr 3 on a small MLP (tests/alerts/test_alerts_zoo.py): 7-11 % steps, loss bouncing near its start
    assert _updates(2.66, [(0.11, 3.9), (0.074, 2.44)]) == ["large_updates"]
    assert _updates(1.0, [(0.3, 1.0), (0.3, 0.98), (0.3, 0.97)]) == ["large_updates"]  # a 3 % fall is no progress


def test_large_updates_of_a_fast_falling_loss_are_not_a_fault():
    # pytorch/examples word_language_model: SGD lr 20 + clip 0.25 steps ~9 %, the loss falls from ln 64
    assert _updates(4.16, [(0.09, 2.4), (0.087, 1.6)]) == []
    # late in that run the loss falls slowly, but it is far below its start
    assert _updates(4.16, [(0.09, 1.2), (0.09, 1.19), (0.09, 1.18)]) == []
    # a negative loss (policy gradient) is judged by its fall only
    assert _updates(-0.5, [(0.2, -0.5), (0.2, -0.51)]) == ["large_updates"]
    assert _updates(-0.5, [(0.2, -0.5), (0.2, -2.0)]) == []


# ---------------------------------------------------------------------- unshuffled data: order by design
def test_full_batch_loader_is_not_unshuffled():
    ds = _ds(97)  # time_sequence_prediction: the whole data set in one L-BFGS batch
    assert check_sampler(RuleContext(), Snapshot(0, 0), DataLoader(ds, batch_size=97)) == []
    assert check_sampler(RuleContext(), Snapshot(0, 0), DataLoader(ds, batch_size=200)) == []
    # two batches: order matters again
    assert [a.code for a in check_sampler(RuleContext(), Snapshot(0, 0), DataLoader(ds, batch_size=50))] == [
        "unshuffled_data"
    ]


class _Chunks(torch.utils.data.Dataset):
    """word_language_model's ``get_batch``: chunk i of a (seq, batch) token stream and its next tokens."""

    def __init__(self, n=20):
        self.source = torch.randint(0, 50, (35 * n + 1, 4))

    def __len__(self):
        return (len(self.source) - 1) // 35

    def __getitem__(self, i):
        return self.source[i * 35 : (i + 1) * 35], self.source[i * 35 + 1 : (i + 1) * 35 + 1].reshape(-1)


def test_prebatched_chunks_read_in_order_are_not_unshuffled():
    loader = DataLoader(_Chunks(), batch_size=None, shuffle=False)
    assert check_sampler(RuleContext(), Snapshot(0, 0), loader) == []


def test_prebatched_sorted_labels_are_still_seen():
    # batch_size=None with class-sorted batches: the label-run check still sees the sort
    batches = [(torch.randn(8, 3), torch.full((8,), b)) for b in range(4)]
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    assert check_sampler(RuleContext(), Snapshot(0, 0), loader) == []
    assert _label_runs(list(loader)) == ["unshuffled_data"]


# ---------------------------------------------------------------------- labels: one per sample
def test_flattened_next_token_targets_are_not_labels():
    data, targets = _Chunks()[0]  # (35, 4) tokens, (140,) targets
    assert batch_labels((data, targets)) is None


def test_labels_of_batch_first_and_time_major_inputs_are_labels():
    y = torch.arange(8) % 3
    assert torch.equal(batch_labels((torch.randn(8, 5), y)), y)
    assert torch.equal(batch_labels((torch.randn(12, 8, 5), y)), y)  # (seq, batch, features)
    assert torch.equal(batch_labels({"x": torch.randn(8, 5), "y": y}), y)
    assert torch.equal(batch_labels((None, y)), y)  # nothing to compare against: taken as they are


# ---------------------------------------------------------------------- gradients not zeroed: two optimizers
class _TwoOptimizers(pl.LightningModule):
    """DCGAN's update order (pytorch/examples dcgan): D zeroes, two backwards, steps; G zeroes, backward
    through D (which leaves D's gradients stale until D zeroes them next batch), steps."""

    def __init__(self, zero_d: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.zero_d = zero_d
        self.g = nn.Linear(4, 8)
        self.d = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        opt_d, opt_g = self.optimizers()
        real = batch[0]
        if self.zero_d:
            opt_d.zero_grad()
        self.manual_backward(nn.functional.softplus(-self.d(real)).mean())
        fake = self.g(torch.randn(len(real), 4))
        self.manual_backward(nn.functional.softplus(self.d(fake.detach())).mean())
        opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(nn.functional.softplus(-self.d(fake)).mean())
        opt_g.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.d.parameters(), lr=1e-3), torch.optim.Adam(self.g.parameters(), lr=1e-3)


def test_a_discriminator_that_is_never_zeroed_is_seen(tmp_path):
    torch.manual_seed(0)
    assert "gradients_not_zeroed" in {a.code for a in _fit(tmp_path, _TwoOptimizers(zero_d=False), _data(), 40)}


def test_two_optimizers_zeroed_before_their_own_backwards_are_not_stale(tmp_path):
    torch.manual_seed(0)
    alerts = _fit(tmp_path, _TwoOptimizers(zero_d=True), _data(), 40)
    assert "gradients_not_zeroed" not in {a.code for a in alerts}, [a.summary() for a in alerts]
