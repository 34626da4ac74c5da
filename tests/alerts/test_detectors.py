"""The fault detectors (lightning_watch/alerts/detectors.py) and their probes: each on a sick and a healthy run."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_trainer, quiet_fit, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import EarlyAlerts, Watch
from lightning_watch.snapshot import Snapshot

CLASSES, FEATURES = 4, 8


def blobs(n: int = 256, scale: float = 1.0, seed: int = 0) -> TensorDataset:
    """Four separable Gaussian blobs, standardized unless ``scale`` says otherwise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    centers = torch.randn(CLASSES, FEATURES, generator=g) * 2
    x = (centers[y] + torch.randn(n, FEATURES, generator=g)) / 2.5
    return TensorDataset(x * scale, y)


def loader(data: TensorDataset | None = None, batch_size: int = 32) -> DataLoader:
    return DataLoader(data or blobs(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


class Classifier(pl.LightningModule):
    """An MLP classifier; ``head`` is applied to the logits (the fault under test), ``detach_after`` cuts the graph."""

    def __init__(self, head: nn.Module | None = None, detach: bool = False, lr: float = 0.1, hidden: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(FEATURES, hidden), nn.Linear(hidden, CLASSES)
        self.head = head if head is not None else nn.Identity()
        self.detach, self.lr = detach, lr

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.detach:
            h = h.detach()  # the fault: fc1 never gets a gradient
        return self.head(self.fc2(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualClassifier(Classifier):
    """Manual optimization; ``zero_grad=False`` forgets ``optimizer.zero_grad()``; returns nothing."""

    def __init__(self, zero_grad: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.zero_grad_each_step = zero_grad
        self.backward_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.backward_losses.append(loss.item())
        if self.zero_grad_each_step:
            opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        # returns None: the loss is known to lightning_watch only through `manual_backward`


def codes(tmp_path, model, data=None, steps=60, every=10, batch_size=32, quiet=True, **alert_args):
    watch = Watch(log_every_n_steps=every, alerts=EarlyAlerts(**alert_args), report=False, pictures=False)
    trainer = make_trainer(tmp_path, [watch], max_steps=steps, max_epochs=None)
    if quiet:
        quiet_fit(trainer, model, loader(data, batch_size), seed=0)
    else:  # warnings shown as they would be to a user
        pl.seed_everything(0, verbose=False)
        trainer.fit(model, loader(data, batch_size))
    return {a.code: a for a in watch.alerts}, trainer


# ---------------------------------------------------------------------- gradient hygiene
def test_a_forgotten_zero_grad_is_an_error_and_a_zeroed_one_is_not(tmp_path):
    sick, _ = codes(tmp_path / "sick", ManualClassifier(zero_grad=False))
    assert sick["gradients_not_zeroed"].severity == "error"
    healthy, _ = codes(tmp_path / "healthy", ManualClassifier(zero_grad=True))
    assert "gradients_not_zeroed" not in healthy


def test_manual_optimization_returning_none_still_feeds_the_loss_rules(tmp_path):
    model = ManualClassifier()
    _, trainer = codes(tmp_path, model, steps=20)
    logged = dict(read_scalars(trainer.log_dir)["watch/global/loss"])
    # the window mean of the losses the model backpropagated (independent record in the module)
    assert logged[9] == pytest.approx(sum(model.backward_losses[:10]) / 10, rel=1e-6)
    assert logged[19] == pytest.approx(sum(model.backward_losses[10:20]) / 10, rel=1e-6)


def test_a_detach_in_forward_leaves_parameters_without_gradient(tmp_path):
    sick, _ = codes(tmp_path / "sick", Classifier(detach=True))
    alert = sick["disconnected_parameters"]
    total = FEATURES * 16 + 16 + 16 * CLASSES + CLASSES
    assert alert.value == pytest.approx((FEATURES * 16 + 16) / total)  # fc1's share of the trainable elements
    assert "fc1" in alert.message
    healthy, _ = codes(tmp_path / "healthy", Classifier())
    assert "disconnected_parameters" not in healthy


# ---------------------------------------------------------------------- data and outputs
def test_raw_scale_inputs_are_unnormalized_and_standardized_ones_are_not(tmp_path):
    data = blobs(scale=255.0)
    sick, trainer = codes(tmp_path / "sick", Classifier(lr=1e-4), data)
    alert = sick["unnormalized_inputs"]
    x = data.tensors[0]
    logged = read_scalars(trainer.log_dir)
    # the logged std is the std of the sampled batches: close to the data set's (shuffled batches)
    assert logged["watch/global/input_std"][0][1] == pytest.approx(x.std().item(), rel=0.2)
    assert alert.value == pytest.approx(
        max(abs(logged["watch/global/input_mean"][0][1]), logged["watch/global/input_std"][0][1]), rel=1e-5
    )
    healthy, _ = codes(tmp_path / "healthy", Classifier())
    assert "unnormalized_inputs" not in healthy


def test_a_softmax_before_cross_entropy_stays_at_chance_and_says_why(tmp_path):
    settings = {"chance_level_loss": {"min_steps": 40}}
    sick, _ = codes(tmp_path / "sick", Classifier(head=nn.Softmax(dim=-1), lr=0.01), steps=80, settings=settings)
    alert = sick["chance_level_loss"]
    assert alert.value >= 0.9 and "softmax" in alert.message
    healthy, _ = codes(tmp_path / "healthy", Classifier(), steps=80, settings=settings)
    assert "chance_level_loss" not in healthy


def test_a_relu_on_the_logits_is_seen_in_the_outputs(tmp_path):
    sick, trainer = codes(tmp_path / "sick", Classifier(head=nn.ReLU()), steps=60)
    assert sick["rectified_outputs"].value > 0.5
    healthy, trainer = codes(tmp_path / "healthy", Classifier(), steps=60)
    assert "rectified_outputs" not in healthy
    assert read_scalars(trainer.log_dir)["watch/global/output_zero_frac"][-1][1] == 0.0


def test_batches_of_one_are_noisy_training(tmp_path):
    sick, trainer = codes(tmp_path / "sick", Classifier(lr=0.2), steps=200, every=40, batch_size=1)
    logged = read_scalars(trainer.log_dir)
    ratios = [std / mean for (_, std), (_, mean) in zip(logged["watch/global/loss_std"], logged["watch/global/loss"])]
    assert sick["noisy_training"].value == pytest.approx(ratios[sick["noisy_training"].step // 40], rel=1e-5)
    # a batch of 32 on the same task, even near convergence (lr 0.5), stays below the threshold
    healthy, _ = codes(tmp_path / "healthy", Classifier(lr=0.5), steps=200, every=40, batch_size=32)
    assert "noisy_training" not in healthy


# ---------------------------------------------------------------------- weights
def test_a_constant_initialisation_makes_symmetric_units(tmp_path):
    # every weight constant: fc1's units get equal gradients (fc2's columns are equal) and stay copies;
    # a constant layer before a random one would break its symmetry at the first step
    model = Classifier()
    for layer in (model.fc1, model.fc2):
        nn.init.constant_(layer.weight, 0.1)
        nn.init.constant_(layer.bias, 0.0)
    sick, _ = codes(tmp_path / "sick", model)
    assert sick["symmetric_units"].module == "fc1" and sick["symmetric_units"].value == 0.0
    healthy, _ = codes(tmp_path / "healthy", Classifier())
    assert "symmetric_units" not in healthy


def test_frozen_parameters_are_information_with_their_share(tmp_path):
    model = Classifier()
    model.fc1.requires_grad_(False)
    sick, _ = codes(tmp_path / "sick", model, steps=10)
    alert = sick["frozen_parameters"]
    total = FEATURES * 16 + 16 + 16 * CLASSES + CLASSES
    assert alert.severity == "info" and alert.value == pytest.approx((FEATURES * 16 + 16) / total)
    assert "fc1" in alert.message and "disconnected_parameters" not in sick  # frozen is not disconnected
    healthy, _ = codes(tmp_path / "healthy", Classifier(), steps=10)
    assert "frozen_parameters" not in healthy


# ---------------------------------------------------------------------- framework warnings and the end of fit
class Regressor(pl.LightningModule):
    def __init__(self, broadcast: bool):
        super().__init__()
        self.net, self.broadcast = nn.Linear(FEATURES, 1), broadcast

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)  # (N, 1)
        target = y.float() if self.broadcast else y.float().unsqueeze(1)  # (N,) broadcasts to (N, N)
        return nn.functional.mse_loss(out, target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_pytorchs_broadcast_warning_becomes_an_alert(tmp_path):
    with pytest.warns(UserWarning, match="target size"):  # PyTorch's warning still reaches the user too
        sick, _ = codes(tmp_path / "sick", Regressor(broadcast=True), steps=10, quiet=False)
    alert = sick["framework_warning"]
    assert "target size" in alert.message and alert.step == 0
    healthy, _ = codes(tmp_path / "healthy", Regressor(broadcast=False), steps=10, quiet=False)
    assert "framework_warning" not in healthy


def test_a_fit_that_ends_while_improving_says_train_longer(tmp_path):
    # a pace bound no curve reaches: what is left is the information (the default warns on this straight fall)
    settings = {"still_improving": {"warn_pace": 100.0}}
    sick, _ = codes(tmp_path / "sick", Classifier(lr=0.1), steps=30, every=10, settings=settings)
    assert sick["still_improving"].severity == "info" and sick["still_improving"].step == 29
    healthy, _ = codes(tmp_path / "healthy", Classifier(lr=0.5), steps=300, every=50)
    assert "still_improving" not in healthy


def test_a_fit_shorter_than_its_logging_interval_is_still_judged(tmp_path):
    watch = Watch(report=False, pictures=False)  # the Trainer's 50-step interval, never reached
    trainer = make_trainer(tmp_path, [watch], max_steps=30, max_epochs=None, log_every_n_steps=50)
    quiet_fit(trainer, Classifier(), loader(), seed=0)
    assert watch.last_snapshot is not None and watch.last_snapshot.final and watch.last_snapshot.step == 29
    loss = read_scalars(trainer.log_dir)["watch/global/loss"]
    assert [step for step, _ in loss] == [29] and math.isfinite(loss[0][1])


def test_classes_that_are_nearly_absent_are_label_imbalance(tmp_path):
    data = blobs(n=1024)
    x, y = data.tensors
    keep = (y < CLASSES // 2) | (torch.arange(len(y)) % 20 == 0)  # the upper half keeps 5 % of its samples
    sick, _ = codes(tmp_path / "sick", Classifier(), TensorDataset(x[keep], y[keep]), steps=100, every=20)
    alert = sick["label_imbalance"]
    counts = torch.bincount(y[keep], minlength=CLASSES).double()
    expected = (counts.min() / counts.sum() * CLASSES).item()  # the whole data set's; batches sample it
    assert alert.value == pytest.approx(expected, rel=0.5) and alert.value < 0.2
    healthy, _ = codes(tmp_path / "healthy", Classifier(), data, steps=100, every=20)
    assert "label_imbalance" not in healthy


def test_a_probe_runs_only_for_enabled_detectors_that_require_it(tmp_path):
    _, on = codes(tmp_path / "on", Classifier(), steps=20)
    # both detectors that read the training inputs' scale switched off
    off_settings = {"unnormalized_inputs": False, "train_val_input_shift": False}
    _, off = codes(tmp_path / "off", Classifier(), steps=20, settings=off_settings)
    assert "watch/global/input_mean" in read_scalars(on.log_dir)
    logged = read_scalars(off.log_dir)
    assert "watch/global/input_mean" not in logged and "watch/global/loss" in logged  # the rest still runs


# ---------------------------------------------------------------------- the end of fit: far from convergence
class RecordingClassifier(Classifier):
    """A ``Classifier`` that records every training loss (an independent record of the curve)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def _least_squares_slope(xs, ys):
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)


def test_a_fit_stopped_while_the_loss_falls_straight_down_is_a_warning(tmp_path):
    model = RecordingClassifier(lr=0.1)  # a steady fall: 30 steps (two windows) are far too few
    sick, _ = codes(tmp_path / "sick", model, steps=30, every=15)
    alert = sick["still_improving"]
    assert alert.severity == "warning" and alert.threshold == 0.5  # a short fit's pace bound
    # the ratio of the end's pace (the two windows' means) to the fit's average pace, recomputed
    means = [sum(model.losses[i : i + 15]) / 15 for i in (0, 15)]
    mids = [7.0, 22.0]
    initial = sum(model.losses[:10]) / 10
    end = _least_squares_slope(mids, means)
    average = (means[-1] - initial) / (mids[-1] - 4.5)
    assert alert.value == pytest.approx(end / average, rel=1e-4) and alert.value >= 0.5
    # the same task trained to convergence levels off: not even the information
    healthy, _ = codes(tmp_path / "healthy", Classifier(lr=0.5), steps=300, every=50)
    assert "still_improving" not in healthy


def _snapshots(losses, every=50, stds=None):
    out = []
    for i, loss in enumerate(losses):
        snap = Snapshot(step=(i + 1) * every - 1, epoch=0)
        snap.put("loss", loss)
        snap.put("loss_std", 0.0 if stds is None else stds[i])
        out.append(snap)
    return out


def test_end_pace_tells_a_straight_fall_from_a_levelled_curve_and_from_noise():
    from lightning_watch.alerts.detectors import end_pace
    from lightning_watch.alerts.rules import RuleContext

    straight = _snapshots([2.0 - 0.1 * i for i in range(8)])
    slope, average, end = end_pace(straight[-1], RuleContext(history=straight[:-1], initial_loss=2.05))
    assert slope == pytest.approx(-0.1 / 50) and slope / average > 0.9 and end == pytest.approx(1.3)
    levelled = _snapshots([2.0 * math.exp(-i) + 0.5 for i in range(8)])
    slope, average, _ = end_pace(levelled[-1], RuleContext(history=levelled[:-1], initial_loss=2.5))
    assert 0 < slope / average < 0.05
    # a fall of 0.01 between windows whose means are uncertain by 0.1 / sqrt(50) each is no fall
    noisy = _snapshots([1.02, 1.01, 1.0], stds=[0.1, 0.1, 0.1])
    assert end_pace(noisy[-1], RuleContext(history=noisy[:-1], initial_loss=1.03)) is None


def test_the_loss_slope_is_the_least_squares_line_of_the_sampled_losses(tmp_path):
    model = RecordingClassifier(lr=0.05)
    watch = Watch(log_every_n_steps=50, report=False, pictures=False)
    trainer = make_trainer(tmp_path, [watch], max_steps=50, max_epochs=None, log_every_n_steps=50)
    quiet_fit(trainer, model, loader(), seed=0)
    sampled = [9, 19, 29, 39, 49]  # five samples per 50-step window
    expected = _least_squares_slope(sampled, [model.losses[s] for s in sampled])
    logged = read_scalars(trainer.log_dir)["watch/global/loss_slope"]
    assert logged[0][0] == 49 and logged[0][1] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- loss / label / output mismatches
class OneOutput(pl.LightningModule):
    """One output per sample, trained with MSE against ``target(y)``."""

    def __init__(self, target):
        super().__init__()
        self.net, self.target = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 1)), target

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(-1), self.target(x, y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_mse_on_class_indices_is_regression_on_class_indices(tmp_path):
    sick, _ = codes(tmp_path / "sick", OneOutput(lambda x, y: y.float()), steps=40)
    alert = sick["regression_on_class_indices"]
    assert alert.value == CLASSES and "0..3" in alert.message
    # a real regression target (floats): the labels are not integers, nothing to say
    floats = TensorDataset(blobs().tensors[0], blobs().tensors[0].sum(dim=1))
    healthy, _ = codes(tmp_path / "healthy", OneOutput(lambda x, y: y), floats, steps=40)
    assert "regression_on_class_indices" not in healthy
    classifier, _ = codes(tmp_path / "classifier", Classifier(), steps=40)
    assert "regression_on_class_indices" not in classifier
    # one column next to class labels it is not trained on (a discriminator): a loss far below their scale
    other, _ = codes(tmp_path / "other", OneOutput(lambda x, y: (x[:, 0] > 0).float() * 0.1), steps=40)
    assert "regression_on_class_indices" not in other


class ProbabilityClassifier(Classifier):
    """Returns probabilities; ``nll_of_log`` trains them correctly (NLL of their log), else with cross-entropy."""

    def __init__(self, nll_of_log: bool, **kwargs):
        super().__init__(head=nn.Softmax(dim=-1), **kwargs)
        self.nll_of_log = nll_of_log

    def training_step(self, batch, batch_idx):
        x, y = batch
        p = self(x)
        if self.nll_of_log:
            return nn.functional.nll_loss(torch.log(p.clamp_min(1e-12)), y)
        return nn.functional.cross_entropy(p, y)


def test_probabilities_fed_to_cross_entropy_hit_its_floor(tmp_path):
    settings = {"probability_outputs": {"min_steps": 40}}
    sick, _ = codes(tmp_path / "sick", ProbabilityClassifier(False, lr=0.5), steps=80, settings=settings)
    alert = sick["probability_outputs"]
    floor = math.log(1 + (CLASSES - 1) / math.e)
    assert alert.threshold == pytest.approx(floor) and alert.value >= 0.98 * floor
    # the same probabilities trained with NLL of their log learn below that floor: nothing to say
    healthy, _ = codes(tmp_path / "healthy", ProbabilityClassifier(True, lr=0.5), steps=80, settings=settings)
    assert "probability_outputs" not in healthy


# ---------------------------------------------------------------------- the model's structure
class DropoutClassifier(Classifier):
    def __init__(self, p: float):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_a_dropout_of_ninety_percent_is_extreme_and_one_of_half_is_not(tmp_path):
    sick, _ = codes(tmp_path / "sick", DropoutClassifier(0.9), steps=20)
    alert = sick["extreme_dropout"]
    assert alert.value == pytest.approx(0.9) and alert.extra["modules"] == ["drop"] and alert.step == 9
    healthy, _ = codes(tmp_path / "healthy", DropoutClassifier(0.5), steps=20)
    assert "extreme_dropout" not in healthy


def test_a_frozen_layer_in_front_of_trainable_ones_warns_when_the_loss_does_not_fall(tmp_path):
    settings = {"frozen_layers": {"min_steps": 40}}
    dead = Classifier()  # fc1 frozen at zero: nothing reaches fc2, the loss stays at ln 4
    nn.init.zeros_(dead.fc1.weight), nn.init.zeros_(dead.fc1.bias)
    dead.fc1.requires_grad_(False)
    sick, _ = codes(tmp_path / "sick", dead, steps=60, settings=settings)
    alert = sick["frozen_layers"]
    assert alert.extra["modules"] == ["fc1"] and alert.value >= 0.9
    # frozen in front, but the loss falls (a usable frozen feature extractor): information only
    frozen = Classifier()
    frozen.fc1.requires_grad_(False)
    healthy, _ = codes(tmp_path / "healthy", frozen, steps=60, settings=settings)
    assert "frozen_layers" not in healthy and healthy["frozen_parameters"].severity == "info"
    # a frozen last layer is behind every trainable one: not this detector's case
    head = Classifier()
    nn.init.zeros_(head.fc2.weight)
    head.fc2.requires_grad_(False)
    behind, _ = codes(tmp_path / "behind", head, steps=60, settings=settings)
    assert "frozen_layers" not in behind


# ---------------------------------------------------------------------- inside recurrent modules
def _naive_gate_saturation(module, x):
    """Saturated / counted first-layer gate pre-activations, by a plain per-step loop (time-major ``x``)."""
    from lightning_watch.alerts.probes import SIGMOID_SATURATION as SIG
    from lightning_watch.alerts.probes import TANH_SATURATION as TANH

    hidden = module.hidden_size
    h = torch.zeros(x.shape[1], hidden)
    c = torch.zeros_like(h)
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    saturated = counted = 0
    for t in range(x.shape[0]):
        gi, gh = x[t] @ w_ih.t() + b_ih, h @ w_hh.t() + b_hh
        if isinstance(module, nn.LSTM):
            i, f, g, o = (gi + gh).chunk(4, dim=1)
            saturated += sum(int((v.abs() >= SIG).sum()) for v in (i, f, o)) + int((g.abs() >= TANH).sum())
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:  # GRU
            ir, iz, in_ = gi.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            saturated += int(((ir + hr).abs() >= SIG).sum() + ((iz + hz).abs() >= SIG).sum())
            saturated += int(((in_ + r * hn).abs() >= TANH).sum())
            h = (1 - z) * n + z * h
        counted += gi.numel()
    return saturated, counted


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gate_saturation_is_recomputed_exactly(kind, batch_first):
    from lightning_watch.alerts.probes import _gate_saturation

    torch.manual_seed(0)
    module = kind(3, 5, batch_first=batch_first)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(6)  # some gates saturated, some not
    x = torch.randn(7, 4, 3)
    given = x.transpose(0, 1) if batch_first else x
    with torch.no_grad():
        counts = _gate_saturation(module, (given,), module(given))
        expected = _naive_gate_saturation(module, x)
    assert counts.tolist() == [float(v) for v in expected] and 0 < expected[0] < expected[1]


class SequenceClassifier(pl.LightningModule):
    """An LSTM over (N, T, F) sequences; the class is the channel with the largest sum over time."""

    def __init__(self):
        super().__init__()
        self.lstm, self.out = nn.LSTM(FEATURES, 16, batch_first=True), nn.Linear(16, CLASSES)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.lstm(x)[0][:, -1]
        return nn.functional.cross_entropy(self.out(h), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def sequences(scale: float, n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, FEATURES, generator=g)
    return TensorDataset(x * scale, x.sum(dim=1)[:, :CLASSES].argmax(dim=1))


def test_raw_scale_sequences_saturate_an_lstms_gates(tmp_path):
    sick, _ = codes(tmp_path / "sick", SequenceClassifier(), sequences(scale=50.0), steps=30)
    alert = sick["saturated_gates"]
    assert alert.module == "lstm" and alert.value > 0.5
    healthy, trainer = codes(tmp_path / "healthy", SequenceClassifier(), sequences(scale=1.0), steps=30)
    assert "saturated_gates" not in healthy
    assert read_scalars(trainer.log_dir)["watch/gate_saturated_frac/lstm"][-1][1] < 0.1


# ---------------------------------------------------------------------- training against validation inputs
class ValidatedClassifier(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def test_noise_on_the_training_inputs_only_is_a_train_val_input_shift(tmp_path):
    clean = blobs()
    x, y = clean.tensors
    noisy = TensorDataset(x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), y)
    watch = Watch(log_every_n_steps=10, report=False, pictures=False)
    trainer = make_trainer(tmp_path / "sick", [watch], max_epochs=3, log_every_n_steps=10)
    val = DataLoader(clean, batch_size=64)
    quiet_fit(trainer, ValidatedClassifier(), loader(noisy), val, seed=0)
    alert = {a.code: a for a in watch.alerts}["train_val_input_shift"]
    logged = read_scalars(trainer.log_dir)
    # the logged validation std is the first validation batch's, computed here independently
    first_val = clean.tensors[0][:64]
    assert logged["watch/global/val_input_std"][-1][1] == pytest.approx(first_val.std(unbiased=False).item(), rel=1e-4)
    assert alert.value > 1.5 and alert.step > 7  # after the first validation (8 batches per epoch)
    # the same clean data for both splits: nothing to say
    watch = Watch(log_every_n_steps=10, report=False, pictures=False)
    trainer = make_trainer(tmp_path / "healthy", [watch], max_epochs=3, log_every_n_steps=10)
    quiet_fit(trainer, ValidatedClassifier(), loader(clean), val, seed=0)
    assert "train_val_input_shift" not in {a.code for a in watch.alerts}
    assert "watch/global/val_input_std" in read_scalars(trainer.log_dir)


def test_batches_of_one_are_noisy_at_a_lower_bound(tmp_path):
    # lr 0.05 and batch 1: per-sample losses vary by about their mean, below the general bound of 1
    sick, trainer = codes(tmp_path / "sick", Classifier(lr=0.05), steps=200, every=40, batch_size=1)
    assert sick["noisy_training"].threshold == 0.5
    assert read_scalars(trainer.log_dir)["watch/global/output_rows"][0][1] == 1.0


# ---------------------------------------------------------------------- two optimizers; labels that are not classes
class NeverZeroed(Classifier):
    """Automatic optimization whose ``optimizer_zero_grad`` was overridden to do nothing."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass


def test_automatic_optimization_without_zeroing_is_an_error_and_accumulation_is_not(tmp_path):
    sick, _ = codes(tmp_path / "sick", NeverZeroed())
    assert sick["gradients_not_zeroed"].severity == "error"
    watch = Watch(log_every_n_steps=10, report=False, pictures=False)
    trainer = make_trainer(tmp_path / "accumulating", [watch], max_steps=30, max_epochs=None, accumulate_grad_batches=4)
    quiet_fit(trainer, Classifier(), loader(None, 32), seed=0)
    assert trainer.global_step == 30  # 120 batches, each logging step spanning four of them
    assert "gradients_not_zeroed" not in {a.code for a in watch.alerts}


class TwoOptimizers(pl.LightningModule):
    """A GAN's pattern: D steps, then G backpropagates through D; ``zero_d`` zeroes D before its own backward."""

    def __init__(self, zero_d: bool):
        super().__init__()
        self.automatic_optimization = False
        self.g, self.d = nn.Linear(4, FEATURES), nn.Linear(FEATURES, 1)
        self.zero_d = zero_d

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x, _ = batch
        fake = self.g(torch.randn(x.shape[0], 4))
        if self.zero_d:
            opt_d.zero_grad()
        self.manual_backward(self.d(x).mean() - self.d(fake.detach()).mean())
        opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(self.d(fake).mean())  # D's gradients grow here too: legitimate
        opt_g.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.g.parameters(), lr=1e-3), torch.optim.SGD(self.d.parameters(), lr=1e-3)


def test_gradients_are_judged_per_optimizer_between_its_own_steps(tmp_path):
    healthy, _ = codes(tmp_path / "healthy", TwoOptimizers(zero_d=True), steps=40)
    assert "gradients_not_zeroed" not in healthy
    sick, _ = codes(tmp_path / "sick", TwoOptimizers(zero_d=False), steps=40)
    assert sick["gradients_not_zeroed"].severity == "error"


class Autoencoder(pl.LightningModule):
    """64 outputs that are pixels, not classes; the batch also carries digit labels 0..9 (balanced)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return nn.functional.mse_loss(self(x), x, reduction="sum")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_outputs_that_are_not_classes_do_not_count_the_classes(tmp_path):
    g = torch.Generator().manual_seed(0)
    digits = TensorDataset(torch.randn(640, 64, generator=g), torch.arange(640) % 10)
    healthy, trainer = codes(tmp_path / "healthy", Autoencoder(), digits, steps=40)
    assert "label_imbalance" not in healthy
    logged = read_scalars(trainer.log_dir)
    assert logged["watch/global/label_classes_seen"][-1][1] == 10.0  # 1 + the largest label
    assert logged["watch/global/label_rarest_share_seen"][-1][1] > 0.5


@pytest.mark.parametrize("host", [True, False], ids=["host sums", "device sums"])
def test_the_loss_trend_fits_the_same_line_with_host_or_device_sums(host):
    from lightning_watch.alerts.probes import LossTrend
    from lightning_watch.cadence import Cadence
    from lightning_watch.snapshot import Snapshot
    from lightning_watch.stats import read_blocks

    trend = LossTrend()
    trend.start(Cadence(log=10, sample=1), torch.device("cpu"), host=host)
    steps = [3, 4, 6, 9, 12]
    losses = [2.0, 1.7, float("nan"), 1.1, 0.4]  # a non-finite loss is left out of the fit
    for step, loss in zip(steps, losses):
        trend.observe(step, torch.tensor(loss, dtype=torch.float64))
    snapshot = Snapshot(step=12, epoch=0)
    trend.finalize(read_blocks([trend.collect()]), snapshot)
    kept = [(s, v) for s, v in zip(steps, losses) if v == v]
    expected = _least_squares_slope([s for s, _ in kept], [v for _, v in kept])
    assert snapshot.get("loss_slope") == pytest.approx(expected, rel=1e-9)
    assert snapshot.get("loss_slope_points") == len(kept)


def test_the_unit_spread_of_each_layer_matches_a_plain_pytorch_reference():
    from lightning_watch.alerts.probes import UnitSymmetry
    from lightning_watch.cadence import Cadence
    from lightning_watch.stats import read_blocks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(8, 5), nn.Linear(5, 2))
    nn.init.constant_(model[3].weight, 0.25)  # symmetric units: spread 0
    probe = UnitSymmetry()
    probe.start(Cadence(log=1, sample=1), torch.device("cpu"), model)
    snapshot = Snapshot(step=0, epoch=0)
    probe.finalize(read_blocks([probe.collect()]), snapshot)
    for name in ("0", "2", "3"):
        w = model.get_submodule(name).weight.detach().flatten(1)
        expected = (w.max(dim=0).values - w.min(dim=0).values).max() / w.abs().max()
        assert snapshot.get("unit_spread", name) == pytest.approx(expected.item(), rel=1e-6)
    assert snapshot.get("unit_spread", "3") == 0.0


def test_the_unit_spread_probe_stops_once_every_layer_has_distinct_units():
    from lightning_watch.alerts.probes import SETTLED_SPREAD, UnitSymmetry
    from lightning_watch.cadence import Cadence
    from lightning_watch.stats import read_blocks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    nn.init.constant_(model[2].weight, 0.5)  # symmetric: the probe must keep measuring
    probe = UnitSymmetry()
    probe.start(Cadence(log=1, sample=1), torch.device("cpu"), model)

    def read() -> Snapshot:
        snapshot = Snapshot(step=0, epoch=0)
        probe.finalize(read_blocks([probe.collect()]), snapshot)
        return snapshot

    assert read().get("unit_spread", "2") == 0.0 and not probe.settled
    with torch.no_grad():  # the symmetry broken: every layer now has distinct units
        model[2].weight.add_(torch.randn(3, 5))
    snapshot = read()
    assert snapshot.get("unit_spread", "0") > SETTLED_SPREAD and snapshot.get("unit_spread", "2") > SETTLED_SPREAD
    assert probe.settled
    assert not probe.collect()  # no statistic in later reads, so no stale value is ever reported
    assert read().modules("unit_spread") == {}


@pytest.mark.parametrize("outputs", [0, 6, 12])
def test_the_label_shares_match_a_direct_count_of_the_labels(outputs):
    from lightning_watch.alerts.probes import LabelProbe
    from lightning_watch.cadence import Cadence
    from lightning_watch.stats import read_blocks

    labels = torch.tensor([0, 0, 0, 1, 3, 3, 5, 5, 5, 5, 7])  # classes 2, 4 and 6 absent; 7 the largest seen
    probe = LabelProbe()
    probe.start(Cadence(log=1, sample=1), torch.device("cpu"))
    probe.observe((torch.zeros(len(labels), 2), labels))
    snapshot = Snapshot(step=0, epoch=0)
    if outputs:
        snapshot.put("output_classes", float(outputs))
    probe.finalize(read_blocks([probe.collect()]), snapshot)

    seen = 8
    assert snapshot.get("label_mean_square") == pytest.approx(float((labels.double() ** 2).mean()))
    for suffix, classes in (("", outputs or seen), ("_seen", seen)):
        counts = torch.bincount(labels, minlength=classes)[:classes].double()
        assert snapshot.get("label_classes" + suffix) == classes
        assert snapshot.get("label_count" + suffix) == counts.sum().item()
        rarest_share = (counts.min() / counts.sum() * classes).item()
        assert snapshot.get("label_rarest_share" + suffix) == pytest.approx(rarest_share)
