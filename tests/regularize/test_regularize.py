"""ActivityRegularizer: gradients equal a hand-written ``loss + penalty`` in every mode, and it is honest.

Every equivalence test trains two copies of one model from the same weights on the same batches:
one whose ``training_step`` adds the penalty by hand (the reference), one with the callback and no
penalty in its code. Gradients are recorded in ``on_before_optimizer_step`` (unscaled under
mixed precision) at every optimizer step and compared. A third run without any penalty shows
the penalty's contribution is large enough that a wrong scale would fail the comparison.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import join_two_process_group, make_trainer, quiet_fit, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import ActivityRegularizer, ActivityRule

L1, L2 = 3e-3, 2e-2


def fc2_l1_l2(out: torch.Tensor) -> torch.Tensor:
    """What the hand-written reference adds for the rule ``{"encoder.fc2": {"l1": L1, "l2": L2}}``."""
    o = out.float()
    return (L1 * o.abs().sum() + L2 * o.pow(2).sum()) / out.shape[0]


class Net(pl.LightningModule):
    """encoder (fc1 -> tanh -> fc2) -> sigmoid -> head; ``penalty`` (if set) is the hand-written one.

    ``penalty(name, output)`` is called on the outputs of ``encoder.fc1`` and ``encoder.fc2`` and
    its sum is added to the loss. ``twice`` calls ``encoder.fc2`` a second time per step.
    ``mode``: "auto", "manual" (one optimizer, ``manual_backward``) or "manual2" (two optimizers,
    two forward/backward passes per batch).
    """

    def __init__(self, penalty=None, mode: str = "auto", twice: bool = False, optimizer: str = "sgd") -> None:
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), fc2=nn.Linear(8, 8)))
        self.squash = nn.Sigmoid()
        self.head = nn.Linear(8, 1)
        self.penalty = penalty
        self.mode = mode
        self.twice = twice
        self.optimizer_name = optimizer
        self.automatic_optimization = mode == "auto"

    def loss(self, batch):
        x, y = batch
        h1 = self.encoder.fc1(x)
        h2 = self.encoder.fc2(self.encoder.act(h1))
        extra = 0.0
        if self.penalty is not None:
            extra = self.penalty("encoder.fc1", h1) + self.penalty("encoder.fc2", h2)
        if self.twice:
            h2 = self.encoder.fc2(torch.tanh(h2))
            if self.penalty is not None:
                extra = extra + self.penalty("encoder.fc2", h2)
        out = self.head(self.squash(h2))
        loss = nn.functional.mse_loss(out.float(), y)
        self.log("train_loss", loss)
        return loss + extra

    def training_step(self, batch, batch_idx):
        if self.mode == "auto":
            return self.loss(batch)
        if self.mode == "manual":
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()
            return None
        enc_opt, head_opt = self.optimizers()
        enc_opt.zero_grad()
        self.manual_backward(self.loss(batch))
        enc_opt.step()
        head_opt.zero_grad()
        self.manual_backward(self.loss(batch))
        head_opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.head(self.squash(self.encoder(x))), y))

    def configure_optimizers(self):
        make = (
            (lambda p: torch.optim.Adam(p, lr=1e-2))
            if self.optimizer_name == "adam"
            else (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        )
        if self.mode == "manual2":
            return make(self.encoder.parameters()), make(self.head.parameters())
        return make(self.parameters())


def loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class GradRecorder(pl.Callback):
    """Copies every parameter's gradient at each optimizer step (unscaled, before clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def run(model: Net, callbacks, tmp_path, **trainer_kw) -> list[dict[str, torch.Tensor]]:
    recorder = GradRecorder()
    kw = {"max_epochs": 1, "logger": False}
    kw.update(trainer_kw)
    trainer = make_trainer(tmp_path, [*callbacks, recorder], **kw)
    quiet_fit(trainer, model, loader())
    return recorder.steps


def max_rel_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) and len(a) > 0
    worst = 0.0
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for name in sa:
            scale = max(sa[name].abs().max().item(), 1e-12)
            worst = max(worst, (sa[name] - sb[name]).abs().max().item() / scale)
    return worst


def reference_penalty(name, out):
    return fc2_l1_l2(out) if name == "encoder.fc2" else 0.0


def compare(tmp_path, mode="auto", tol=1e-5, twice=False, optimizer="sgd", **trainer_kw):
    torch.manual_seed(0)
    base = Net(mode=mode, twice=twice, optimizer=optimizer)
    hand = copy.deepcopy(base)
    hand.penalty = reference_penalty
    plain = copy.deepcopy(base)
    reg = ActivityRegularizer({"encoder.fc2": {"l1": L1, "l2": L2}})
    got = run(base, [reg], tmp_path / "cb", **trainer_kw)
    want = run(hand, [], tmp_path / "hand", **trainer_kw)
    without = run(plain, [], tmp_path / "plain", **trainer_kw)
    assert max_rel_diff(got, want) < tol
    # the penalty changes the gradients far beyond the tolerance: the comparison is not vacuous
    assert max_rel_diff(without, want) > 100 * tol
    return got


@pytest.mark.parametrize(
    ("mode", "kw"),
    [
        ("auto", {}),
        ("manual", {}),
        ("manual2", {}),
        ("auto", {"accumulate_grad_batches": 2}),
        ("auto", {"precision": "bf16-mixed"}),
        ("manual", {"precision": "bf16-mixed"}),
    ],
    ids=["automatic", "manual", "two-optimizers", "accumulate-2", "bf16-mixed", "bf16-mixed-manual"],
)
def test_gradients_equal_hand_written_penalty(tmp_path, mode, kw):
    steps = compare(tmp_path, mode=mode, **kw)
    # 6 batches: one optimizer step each, two with two optimizers, one per two batches when accumulating
    assert len(steps) == {"manual2": 12}.get(mode, 3 if "accumulate_grad_batches" in kw else 6)


def test_gradients_equal_under_16_mixed_loss_scaling(tmp_path):
    # Lightning turns `precision="16-mixed"` into bf16 on CPU; a MixedPrecision plugin with a CPU
    # GradScaler runs real float16 autocast and loss scaling. The penalty must be scaled with the
    # loss: added after scaling it would be 1024 times too weak, added twice twice too strong.
    from lightning.pytorch.plugins.precision import MixedPrecision

    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))

    torch.manual_seed(0)
    base = Net()
    hand, plain = copy.deepcopy(base), copy.deepcopy(base)
    hand.penalty = reference_penalty
    reg = ActivityRegularizer({"encoder.fc2": {"l1": L1, "l2": L2}})
    got = run(base, [reg], tmp_path / "cb", plugins=[plugin()])
    want = run(hand, [], tmp_path / "hand", plugins=[plugin()])
    without = run(plain, [], tmp_path / "plain", plugins=[plugin()])
    assert max_rel_diff(got, want) < 1e-5
    assert max_rel_diff(without, want) > 1e-2


def test_adam_layer_called_twice_and_two_rules_on_one_layer(tmp_path):
    # encoder.fc2 runs twice per step and is selected by two rules (a glob with a callable, a name
    # with l2); encoder.fc1 is selected by the glob only. Every call gets every rule's penalty.
    def fancy(out):
        return out.float().abs().amax(dim=-1).sum()

    def hand_penalty(name, out):
        wide = out.float()
        total = 0.05 * fancy(out) / out.shape[0]
        if name == "encoder.fc2":
            total = total + L2 * wide.pow(2).sum() / out.shape[0]
        return total

    torch.manual_seed(0)
    base = Net(twice=True, optimizer="adam")
    hand, plain = copy.deepcopy(base), copy.deepcopy(base)
    hand.penalty = hand_penalty
    reg = ActivityRegularizer(
        [
            ActivityRule(include="encoder.fc*", fn=fancy, weight=0.05, name="peaks"),
            ActivityRule(include="encoder.fc2", l2=L2),
        ]
    )
    got = run(base, [reg], tmp_path / "cb")
    want = run(hand, [], tmp_path / "hand")
    without = run(plain, [], tmp_path / "plain")
    assert max_rel_diff(got, want) < 1e-5
    assert max_rel_diff(without, want) > 1e-2


# ---------------------------------------------------------------------- logged values in closed form
class Identity(pl.LightningModule):
    """The penalized layer returns the input unchanged, so penalties have closed forms in the data."""

    def __init__(self) -> None:
        super().__init__()
        self.ident = nn.Identity()
        self.scale = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.scale(self.ident(x)).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_logged_penalties_and_scale_match_closed_forms(tmp_path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, generator=g)
    batches = x.split(4)  # 3 steps of 4 samples
    schedule = [0.0, 1.0, 2.0]
    reg = ActivityRegularizer(
        {
            "ident": {"l1": 0.5, "l2": 0.25, "weight": lambda step: schedule[step]},
            "iden?": {"fn": lambda out: out.sum(), "reduction": "sum"},
        },
        log_every_n_steps=1,
    )
    trainer = make_trainer(tmp_path, [reg], max_epochs=1)
    quiet_fit(trainer, Identity(), DataLoader(TensorDataset(x), batch_size=4))
    scalars = read_scalars(tmp_path / "tb")
    first = [(0.5 * b.abs().sum() + 0.25 * b.pow(2).sum()).item() / 4 * w for b, w in zip(batches, schedule)]
    second = [b.sum().item() for b in batches]
    got_first = [v for _, v in scalars["watch/activity_penalty/ident"]]
    got_second = [v for _, v in scalars["watch/activity_penalty/iden?"]]
    got_total = [v for _, v in scalars["watch/global/activity_penalty"]]
    assert [s for s, _ in scalars["watch/activity_penalty/ident"]] == [0, 1, 2]
    assert got_first == pytest.approx(first, rel=1e-5)
    assert got_second == pytest.approx(second, rel=1e-5, abs=1e-6)
    assert got_total == pytest.approx([a + b for a, b in zip(first, second)], rel=1e-5, abs=1e-6)
    rms = [v for _, v in scalars["watch/activity_rms/ident"]]
    assert rms == pytest.approx([b.pow(2).mean().sqrt().item() for b in batches], rel=1e-5)
    # the user's own train_loss is what the module logged, without the penalty
    losses = [v for _, v in scalars["train_loss"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert reg.last_snapshot.get("activity_penalty", "ident") == pytest.approx(first[-1], rel=1e-5)


class LossSpy(pl.Callback):
    """What Lightning reports: ``outputs["loss"]`` and the tensor handed to ``on_before_backward``."""

    def __init__(self) -> None:
        self.reported: list[float] = []
        self.backpropagated: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.backpropagated.append(loss.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reported.append(outputs["loss"].item())


def test_reported_loss_excludes_penalty_backpropagated_total_includes_it(tmp_path):
    torch.manual_seed(0)
    model = Net()
    hand = copy.deepcopy(model)
    hand.penalty = reference_penalty
    spy, hand_spy = LossSpy(), LossSpy()
    run(model, [ActivityRegularizer({"encoder.fc2": {"l1": L1, "l2": L2}}), spy], tmp_path / "cb")
    run(hand, [hand_spy], tmp_path / "hand")
    # the hand-written module returns loss + penalty; the callback leaves the returned loss alone
    assert spy.backpropagated == pytest.approx(hand_spy.backpropagated, rel=1e-6)
    assert spy.backpropagated == pytest.approx(hand_spy.reported, rel=1e-6)
    gaps = [total - plain for total, plain in zip(spy.backpropagated, spy.reported)]
    assert all(gap > 1e-3 for gap in gaps)


# ---------------------------------------------------------------------- no penalty outside training
def test_validation_and_no_grad_add_nothing_and_keep_no_graph(tmp_path):
    calls: list[tuple[bool, bool]] = []

    def spy(out):
        calls.append((torch.is_grad_enabled(), out.requires_grad))
        return out.float().pow(2).sum()

    torch.manual_seed(0)
    model = Net()
    reg = ActivityRegularizer({"encoder.fc2": spy}, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [reg], max_epochs=2, logger=False, num_sanity_val_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), loader(n=16))  # 2 validation batches per epoch, 6 training
        trainer.validate(model, loader(n=16))
    # only the 12 training forwards: no sanity check, validation or trainer.validate call
    assert len(calls) == 12 and all(grad and req for grad, req in calls)
    assert all(term is None for term in reg._pending)


# ---------------------------------------------------------------------- teardown
def test_teardown_restores_model_and_strategy(tmp_path):
    torch.manual_seed(0)
    model = Net()
    reg = ActivityRegularizer({"encoder.*": {"l2": 1e-3}})
    trainer = make_trainer(tmp_path, [reg], logger=False)
    class_backward = type(trainer.strategy).backward
    quiet_fit(trainer, model, loader())
    assert reg.module_names == []
    assert all(not m._forward_hooks for m in model.modules())
    assert "backward" not in vars(trainer.strategy)
    assert type(trainer.strategy).backward is class_backward
    restored = pickle.loads(pickle.dumps(model))
    x = torch.randn(3, 4)
    assert torch.equal(restored.head(restored.squash(restored.encoder(x))), model.head(model.squash(model.encoder(x))))
    # a second fit with the same callback penalizes again, exactly once
    second = make_trainer(tmp_path, [reg], logger=False, max_steps=2)
    quiet_fit(second, model, loader())
    assert "backward" not in vars(second.strategy)


def test_two_regularizers_share_one_patch_and_both_count(tmp_path):
    torch.manual_seed(0)
    base = Net()
    hand = copy.deepcopy(base)
    hand.penalty = reference_penalty
    first = ActivityRegularizer({"encoder.fc2": {"l1": L1}})
    second = ActivityRegularizer({"encoder.fc2": {"l2": L2}})
    got = run(base, [first, second], tmp_path / "cb")
    want = run(hand, [], tmp_path / "hand")
    assert max_rel_diff(got, want) < 1e-5


def test_exception_in_training_restores_model(tmp_path):
    class Boom(Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = Boom()
    trainer = make_trainer(tmp_path, [ActivityRegularizer({"encoder.fc2": {"l2": 1.0}})], logger=False)
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    assert all(not m._forward_hooks for m in model.modules())
    assert "backward" not in vars(trainer.strategy)


# ---------------------------------------------------------------------- bad input


def fit_quietly(tmp_path, model, reg, **kw):
    trainer = make_trainer(tmp_path, [reg], logger=False, max_steps=2, **kw)
    quiet_fit(trainer, model, loader())
    return trainer


def test_pattern_matching_nothing_fails_at_fit_start_naming_the_rule(tmp_path):
    reg = ActivityRegularizer({"encoder.fc2": {"l2": 1.0}, "decoder.*": {"l1": 1.0}})
    with pytest.raises(ValueError, match=r"rule 'decoder.\*': `include` pattern 'decoder.\*' matches no module of Net"):
        fit_quietly(tmp_path, Net(), reg)
    reg = ActivityRegularizer(ActivityRule(types="Conv2d", l2=1.0))
    with pytest.raises(ValueError, match=r"rule 'Conv2d' selects no module of Net"):
        fit_quietly(tmp_path, Net(), reg)


def test_bad_values_during_training_name_the_rule(tmp_path):
    reg = ActivityRegularizer({"encoder.fc2": {"fn": lambda out: out.pow(2).sum(dim=0)}})
    with pytest.raises(ValueError, match=r"`fn` of rule 'encoder.fc2' must return a scalar .* shape \(8,\)"):
        fit_quietly(tmp_path, Net(), reg)
    reg = ActivityRegularizer({"encoder.fc2": {"l2": 1.0, "weight": lambda step: -0.5}})
    with pytest.raises(ValueError, match=r"`weight` of rule 'encoder.fc2' \(returned by its schedule at step 0\)"):
        fit_quietly(tmp_path, Net(), reg)


class WithIndices(Net):
    """Adds a layer whose output is an integer tensor (a bucketing step)."""

    def __init__(self) -> None:
        super().__init__()
        self.bucket = Bucket()

    def training_step(self, batch, batch_idx):
        self.bucket(batch[0])
        return super().training_step(batch, batch_idx)


class Bucket(nn.Module):
    def forward(self, x):
        return torch.bucketize(x, torch.tensor([-1.0, 0.0, 1.0]))


def test_penalty_on_integer_output_fails_naming_rule_and_module(tmp_path):
    reg = ActivityRegularizer({"buck*": {"l1": 1.0}})
    with pytest.raises(TypeError, match=r"rule 'buck\*' penalizes module 'bucket', whose output has dtype torch.int64"):
        fit_quietly(tmp_path, WithIndices(), reg)


# ---------------------------------------------------------------------- DDP
def final_parameters(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ddp_worker(rank: int, out: str, port: int) -> None:
    """One of 2 gloo processes: four fits with Lightning's DDPStrategy, launched externally.

    The processes are started here (as torchrun would) rather than by ``strategy="ddp_spawn"``,
    so that one start serves four fits; each fit still runs Lightning's DDP strategy (the model
    wrapped in DistributedDataParallel, a DistributedSampler, one gradient all-reduce per step).
    """
    join_two_process_group(rank, port)
    results = {}
    try:
        for mode in ("auto", "manual"):
            torch.manual_seed(0)
            base = Net(mode=mode)
            hand = copy.deepcopy(base)
            hand.penalty = reference_penalty
            reg = ActivityRegularizer({"encoder.fc2": {"l1": L1, "l2": L2}}, log_every_n_steps=1)
            for name, model, callbacks in (("callback", base, [reg]), ("hand", hand, [])):
                trainer = make_trainer(Path(out) / f"{mode}-{name}", callbacks, strategy="ddp", devices=2, logger=False)
                quiet_fit(trainer, model, loader(n=32, batch_size=8))  # 2 steps of 2 x 8 samples
                results[(mode, name)] = final_parameters(model)
            results[(mode, "logged")] = reg.last_snapshot.get("activity_penalty", "encoder.fc2")
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_hand_written_penalty(tmp_path):
    # Each of 2 gloo processes adds the penalty of its local batch to its own loss, inside its one
    # backward; DDP averages the gradients. The hand-written module does the same by construction.
    # A second backward per step would fail in DDP's reducer or double the penalty.
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), find_free_network_port()), nprocs=2)
    results = torch.load(tmp_path / "results.pt")
    # Without a penalty, averaging two ranks' mean losses over 8 samples equals one process's mean
    # over the same 16 samples: this single-process run is the DDP run minus the penalty.
    torch.manual_seed(0)
    plain = Net()
    trainer = make_trainer(tmp_path / "plain", [], logger=False)
    quiet_fit(trainer, plain, loader(n=32, batch_size=16))
    without = final_parameters(plain)
    for mode in ("auto", "manual"):
        got, want = results[(mode, "callback")], results[(mode, "hand")]
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
        assert max((without[n] - want[n]).abs().max().item() for n in got) > 1e-3
        assert results[(mode, "logged")] > 0  # the penalty was read across both processes


# ---------------------------------------------------------------------- the saturated sigmoid
class SaturatedSigmoid(pl.LightningModule):
    """Small inputs (in [0, 1)) and small weights (|w| <= 0.3), yet fc1's outputs are about ±115.

    1024 positive inputs times same-signed weights add up; the sigmoid after fc1 is saturated,
    its gradient is ~exp(-115), and fc1 cannot learn its way out.
    """

    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1024, 16)
        with torch.no_grad():
            sign = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)[:, None]
            self.fc1.weight.uniform_(0.15, 0.3).mul_(sign)
            self.fc1.bias.zero_()
        self.squash = nn.Sigmoid()
        self.head = nn.Linear(16, 1)
        self.weight_decay = weight_decay

    def forward(self, x):
        return self.head(self.squash(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=self.weight_decay)


def saturation(model: SaturatedSigmoid, x: torch.Tensor) -> tuple[float, float]:
    """Share of sigmoid outputs within 0.01 of 0 or 1, and the RMS of fc1's outputs."""
    with torch.no_grad():
        pre = model.fc1(x)
        s = torch.sigmoid(pre)
        return ((s < 0.01) | (s > 0.99)).float().mean().item(), pre.pow(2).mean().sqrt().item()


def test_activity_penalty_unsaturates_the_sigmoid_where_weight_decay_cannot(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1024, generator=g)
    y = 20 * (x[:, :512].mean(1, keepdim=True) - x[:, 512:].mean(1, keepdim=True))
    data = DataLoader(TensorDataset(x, y), batch_size=32)  # 8 steps per epoch
    results = {}
    for name, weight_decay, callbacks in (
        ("plain", 0.0, []),
        ("weight_decay", 5e-3, []),  # the kernel regularizer, same coefficient
        ("activity", 0.0, [ActivityRegularizer({"fc1": {"l2": 5e-3}}, log_every_n_steps=8)]),
    ):
        torch.manual_seed(0)
        model = SaturatedSigmoid(weight_decay)
        before = saturation(model, x)
        trainer = make_trainer(tmp_path / name, callbacks, max_epochs=3)
        quiet_fit(trainer, model, data)
        results[name] = (before, saturation(model, x))
    for before, _ in results.values():
        assert before[0] == 1.0 and before[1] > 100  # every sigmoid output saturated, |fc1| ~ 115
    assert results["plain"][1][0] == 1.0  # no gradient reaches fc1 through the saturated sigmoid
    assert results["weight_decay"][1][0] > 0.99 and results["weight_decay"][1][1] > 100
    saturated, rms = results["activity"][1]
    assert saturated < 0.05 and rms < 5
    # the callback's own log tells the same story, read back with TensorBoard's reader
    logged = [v for _, v in read_scalars(tmp_path / "activity" / "tb")["watch/activity_rms/fc1"]]
    assert len(logged) == 3 and logged[0] > 10 * logged[-1] and logged[-1] < 5


# ---------------------------------------------------------------------- CUDA (skipped without a GPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_cuda_gradients_equal_hand_written_penalty(tmp_path, precision):
    compare(tmp_path, accelerator="cuda", precision=precision)


@cuda
def test_cuda_penalty_path_never_waits_for_the_device(tmp_path):
    # Every hook call and every backward's drain runs with CUDA's sync debug mode set to "error":
    # any host-device synchronization in them (.item(), a host read, a blocking copy) raises.
    reg = ActivityRegularizer({"encoder.fc2": {"l1": L1, "l2": L2}, "encoder.*": {"l2": 1e-4}}, log_every_n_steps=50)
    calls = {"penalize": 0, "drain": 0}

    def strict(method, key):
        def wrapped(*args):
            calls[key] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapped

    reg._penalize = strict(reg._penalize, "penalize")
    reg._drain = strict(reg._drain, "drain")
    torch.manual_seed(0)
    run(Net(), [reg], tmp_path, accelerator="cuda", precision="16-mixed")
    assert calls == {"penalize": 18, "drain": 6}  # 6 batches x 3 penalized modules; one backward each


def test_manual_optimization_without_manual_backward_warns_and_drops_the_graph(tmp_path):
    from lightning_watch import WatchWarning

    class RawBackward(Net):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.loss(batch).backward()  # bypasses Lightning: the penalty cannot be added
            opt.step()

    torch.manual_seed(0)
    reg = ActivityRegularizer({"encoder.fc2": {"l2": 1.0}})
    trainer = make_trainer(tmp_path, [reg], logger=False, max_steps=2)
    with pytest.warns(WatchWarning, match=r"call `self.manual_backward\(loss\)`"):
        trainer.fit(RawBackward(mode="manual"), loader())
    assert all(term is None for term in reg._pending)
