"""Every dtype: complex, float64, bfloat16/float16 and integer tensors are measured or skipped, never a crash."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit_bare_and_watched, last, sq
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import Watch, WatchWarning
from lightning_watch.monitors.params import ParameterTable
from lightning_watch.stats import grad_rows_alive, l2_norms, moments, nonfinite_count


# ---------------------------------------------------------------------------- kernels
def test_l2_norms_of_mixed_dtypes_equal_a_float64_reference():
    torch.manual_seed(0)
    tensors = [
        torch.randn(5, 3, dtype=torch.cfloat),
        torch.randn(7, dtype=torch.cdouble),
        torch.randn(4, 4).to(torch.bfloat16),
        torch.randn(6).to(torch.float16),
        torch.randn(3, dtype=torch.float64),
        torch.arange(5),  # an integer buffer
        torch.tensor([True, False, True]),
    ]
    norms = l2_norms(tensors)
    for t, n in zip(tensors, norms):
        assert n.dtype in (torch.float32, torch.float64) and not n.is_complex()
        assert n.item() == pytest.approx(
            math.sqrt(sq(t.to(torch.cdouble if t.is_complex() else torch.float64))), rel=1e-6
        )
    assert norms[4].dtype == torch.float64  # float64 statistics stay float64


def test_complex_kernels_measure_the_magnitude():
    z = torch.tensor([[3 + 4j, 0j], [0j, 0j], [float("nan") + 1j, 1j]], dtype=torch.cfloat)
    assert nonfinite_count(z).item() == 1.0
    assert grad_rows_alive(z[:2]).tolist() == [True, False]
    assert grad_rows_alive(torch.tensor([[0j, 1j]])).tolist() == [True]
    m = moments(torch.tensor([3 + 4j, 0j]))
    assert m.summed[0].item() == 5.0 and m.summed[1].item() == 25.0 and m.high.item() == 5.0
    # a float64 and a float32 norm of one module add up in float64
    layer = nn.Linear(1, 1)
    squares = torch.stack([torch.tensor(3.0, dtype=torch.float64), torch.tensor(4.0)]).square().view(1, -1)
    per_module = ParameterTable([("layer", layer)]).per_module([layer.weight, layer.bias], squares, torch.device("cpu"))
    assert per_module.dtype == torch.float64 and per_module[0, 0].sqrt().item() == 5.0


def test_integer_moments_do_not_crash():
    m = moments(torch.arange(4))
    assert m.summed[0].item() == 6.0 and m.count == 4


# ---------------------------------------------------------------------------- a Fourier layer
class SpectralConv1d(nn.Module):
    """FNO-style layer: keep the lowest ``modes`` Fourier modes and mix channels with complex weights."""

    def __init__(self, channels: int, modes: int) -> None:
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(channels, channels, modes, dtype=torch.cfloat) / channels)

    def forward(self, x):  # (B, C, L) real
        x_ft = torch.fft.rfft(x)  # (B, C, L // 2 + 1) complex
        out = torch.zeros_like(x_ft)
        out[..., : self.modes] = torch.einsum("bix,iox->box", x_ft[..., : self.modes], self.weight)
        return torch.fft.irfft(out, n=x.shape[-1])


class Spectrum(nn.Module):
    """Returns the complex spectrum: an output the activation monitor measures as |z|."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # owns a parameter: watched by default

    def forward(self, x):
        return torch.fft.rfft(x * self.gain)


class FNO(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Conv1d(1, 4, 1)
        self.spectral = SpectralConv1d(4, 5)
        self.spectrum = Spectrum()
        self.act = nn.GELU()
        self.proj = nn.Conv1d(4, 1, 1)

    def forward(self, x):
        h = self.lift(x)
        h = self.act(self.spectral(h) + h)
        spectrum = self.spectrum(h)
        return self.proj(h) + 0.0 * spectrum.abs().mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fno_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1, 16, generator=g)
    y = torch.roll(x, 1, dims=-1)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_fno_with_a_complex_parameter_trains_identically_and_logs_true_norms(tmp_path):
    bare, rec, scalars, _, caught = fit_bare_and_watched(
        tmp_path, FNO, fno_loader, lambda: Watch(log_every_n_steps=10, alerts=False, pictures=False), max_steps=25
    )
    assert len(rec.losses) == 25
    assert rec.losses == bare.losses  # bitwise: the monitor changed nothing
    assert [s for s, _ in scalars["watch/grad_norm/spectral"]] == [9, 19]
    for step, value in scalars["watch/grad_norm/spectral"]:
        assert value == pytest.approx(rec.grad(step, ["spectral.weight"]), rel=1e-5)
    for step, value in scalars["watch/global/grad_norm"]:
        assert value == pytest.approx(rec.grad(step, list(rec.grads[step])), rel=1e-5)
    step, value = last(scalars, "watch/param_norm/spectral")
    assert value == pytest.approx(rec.weight(step, ["spectral.weight"]), rel=1e-5)
    step, value = last(scalars, "watch/update_norm/spectral")
    assert value == pytest.approx(rec.update(step, ["spectral.weight"]), rel=1e-4)
    # the complex spectrum is measured as |z|: a positive RMS, no "unmeasurable" warning
    assert last(scalars, "watch/act_rms/spectrum")[1] > 0
    assert not [w for w in caught if issubclass(w.category, WatchWarning)], [str(w.message) for w in caught]


# ---------------------------------------------------------------------------- real dtypes
class Mlp(pl.LightningModule):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).to(dtype)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # an integer buffer
        # an integer, frozen parameter (a lookup table): measured by nobody, crashing nobody
        self.table = nn.Parameter(torch.arange(4), requires_grad=False)
        self.argmax = ArgMax()
        self.dtype_ = dtype

    def forward(self, x):
        self.calls += 1
        out = self.net(x.to(self.dtype_))
        _ = self.argmax(out)
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax(dim=-1)  # an integer output: skipped with one warning


def mlp_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


@pytest.mark.parametrize(
    ("dtype", "rel"), [(torch.float64, 1e-12), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)], ids=str
)
def test_float64_and_half_models_are_measured_exactly(tmp_path, dtype, rel):
    bare, rec, scalars, model, caught = fit_bare_and_watched(
        tmp_path,
        lambda: Mlp(dtype),
        mlp_loader,
        lambda: Watch(log_every_n_steps=5, alerts=False, pictures=False, include=["net.*", "argmax"]),
        max_steps=10,
    )
    assert rec.losses == bare.losses
    tb_rel = max(rel, 1e-6)  # TensorBoard stores float32 values
    for step, value in scalars["watch/grad_norm/net.0"]:
        assert value == pytest.approx(rec.grad(step, ["net.0.weight", "net.0.bias"]), rel=tb_rel)
    snapshot = rec.watch.last_snapshot  # full precision: float64 statistics of a float64 model
    assert snapshot.get("grad_norm", "net.0") == pytest.approx(
        rec.grad(snapshot.step, ["net.0.weight", "net.0.bias"]), rel=rel
    )
    for step, value in scalars["watch/global/grad_norm"]:
        assert value == pytest.approx(rec.grad(step, list(rec.grads[step])), rel=tb_rel)
    step, value = last(scalars, "watch/param_norm/net.2")
    assert value == pytest.approx(rec.weight(step, ["net.2.weight", "net.2.bias"]), rel=tb_rel)
    messages = [str(w.message) for w in caught if issubclass(w.category, WatchWarning)]
    assert len([m for m in messages if "argmax" in m]) == 1, messages  # one warning, then silence
    assert int(model.calls) == 10


def test_integer_parameter_is_left_alone_by_every_monitor(tmp_path):
    torch.manual_seed(0)
    from helpers import make_trainer

    model = Mlp()
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2, alerts=False, pictures=False)], max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WatchWarning)
        trainer.fit(model, mlp_loader())
    assert model.table.tolist() == [0, 1, 2, 3]
