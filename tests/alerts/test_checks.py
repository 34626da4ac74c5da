"""The one-time fit-start checks, called directly on small modules (no Trainer)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_watch.alerts import RuleContext
from lightning_watch.snapshot import Snapshot


def test_batch_mixing_check_leaves_the_model_and_rng_untouched():
    from lightning_watch.alerts.checks import check_batch_mixing

    class Mixer(nn.Module):
        """BatchNorm, dropout and an RNN over the batch axis (a (B, T, F) tensor given to batch_first=False)."""

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.drop = nn.Dropout(0.5)
            self.rnn = nn.GRU(4, 4)

        def forward(self, x):
            h = self.drop(self.bn(x.transpose(1, 2)).transpose(1, 2))
            return self.rnn(h)[0][:, -1]

    torch.manual_seed(0)
    model = Mixer().train()
    model.drop.eval()  # a module the user put in eval mode on purpose stays so
    x = torch.randn(6, 5, 4)
    model(x).sum().backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    rng = torch.get_rng_state()
    found = check_batch_mixing(RuleContext(), Snapshot(0, 0), model, (x, None))
    assert [a.code for a in found] == ["batch_mixing"]
    assert found[0].extra["affected_sample"] > found[0].extra["perturbed_sample"]  # the RNN runs forward
    assert model.training and model.bn.training and not model.drop.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN running stats too
    assert all(torch.equal(g, p.grad) for (_, p), g in zip(model.named_parameters(), grads.values()))
    assert torch.equal(rng, torch.get_rng_state())
    # the same layers used with the right layout do not mix samples
    model.rnn.batch_first = True
    assert check_batch_mixing(RuleContext(), Snapshot(0, 0), model, (x, None)) == []


def test_mixing_backward_along_the_batch_is_seen_from_the_last_sample():
    from lightning_watch.alerts.checks import check_batch_mixing

    class Reverse(nn.Module):
        def forward(self, x):  # sample i depends on samples after it only: sample 0 perturbed changes nothing
            return x.flip(0).cumsum(0).flip(0)

    found = check_batch_mixing(RuleContext(), Snapshot(0, 0), Reverse(), torch.randn(5, 3))
    assert found and found[0].extra["affected_sample"] < found[0].extra["perturbed_sample"]


def test_small_batch_norm_counts_the_global_batch_for_sync_batch_norm():
    from lightning_watch.alerts.checks import check_batch_norm

    ctx, at = RuleContext(), Snapshot(0, 0)
    assert [a.module for a in check_batch_norm(ctx, at, {"bn1": (4, False), "bn2": (16, False)}, 1)] == ["bn1"]
    assert check_batch_norm(ctx, at, {"bn": (4, True)}, world_size=2) == []  # 8 samples over 2 ranks
    assert check_batch_norm(ctx, at, {"bn": (4, False)}, world_size=2)  # plain BN: 4 per device
