"""One-time checks at the start of fit: data order, batch mixing, small BatchNorm batches, seeding.

These run once (a few host reads and, for batch mixing, four extra forward passes of the first
batch under ``torch.no_grad``), so unlike the snapshot rules they may look at tensor values.
Each returns alerts through a :class:`~lightning_watch.alerts.rules.RuleContext` so that they
share the rules' settings and alert format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from lightning_watch.alerts.alert import Alert
from lightning_watch.alerts.rules import RuleContext
from lightning_watch.snapshot import Snapshot

_UNSHUFFLED_HINT = (
    "Pass `shuffle=True` to the training DataLoader (or shuffle an iterable data set's source, e.g. with a "
    "shuffle buffer)."
)


def _loaders(obj: Any) -> list[DataLoader]:
    if isinstance(obj, DataLoader):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [loader for item in obj for loader in _loaders(item)]
    return []


def check_sampler(ctx: RuleContext, at: Snapshot, train_dataloader: Any) -> list[Alert]:
    """``unshuffled_data`` when a map-style training loader samples in order."""
    out = []
    for loader in _loaders(train_dataloader):
        if isinstance(loader.dataset, IterableDataset):
            continue  # order is the data set's business: judged by label runs instead
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        ordered = isinstance(sampler, SequentialSampler) and (inner is None or isinstance(inner, SequentialSampler))
        # under DDP Lightning swaps in a DistributedSampler that keeps the original choice
        ordered |= isinstance(sampler, DistributedSampler) and not sampler.shuffle
        ordered |= isinstance(inner, DistributedSampler) and not inner.shuffle
        if ordered and len(loader.dataset) > 1:
            out.append(
                ctx.alert(
                    "unshuffled_data",
                    at,
                    None,
                    1.0,
                    0.0,
                    "The training DataLoader reads its map-style data set in order (sequential sampler): every "
                    "epoch sees the same batches in the same order.",
                    _UNSHUFFLED_HINT,
                    sampler=type(sampler).__name__,
                )
            )
            break
    return out


class LabelRunCheck:
    """``unshuffled_data`` when the first batches each hold a single label (sorted data)."""

    def __init__(self, batches: int) -> None:
        self.batches = int(batches)
        self.single = 0
        self.seen = 0
        self.labels: set[int] = set()

    @property
    def done(self) -> bool:
        return self.seen >= self.batches

    def observe(self, batch: Any) -> None:
        labels = _labels(batch)
        if labels is None or self.done:
            self.seen = self.batches if labels is None else self.seen
            return
        self.seen += 1
        # one-time check: a host read of the first few label vectors
        values = labels.unique().tolist()
        self.labels.update(values)
        self.single += len(values) == 1

    def result(self, ctx: RuleContext, at: Snapshot) -> list[Alert]:
        if self.single < self.batches:
            return []
        return [
            ctx.alert(
                "unshuffled_data",
                at,
                None,
                float(self.single),
                float(self.batches),
                f"Each of the first {self.single} training batches holds a single label: the data arrive sorted "
                "by class, so the model chases one class at a time.",
                _UNSHUFFLED_HINT,
            )
        ]


def _labels(batch: Any) -> Tensor | None:
    """The integer label vector of an ``(inputs, labels, ...)`` batch, if there is one."""
    if isinstance(batch, Mapping):
        batch = [batch.get("x"), batch.get("y", batch.get("label", batch.get("labels")))]
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        return None
    y = batch[1]
    if not isinstance(y, Tensor) or y.dim() != 1 or y.numel() < 2:
        return None
    if y.is_floating_point() or y.dtype == torch.bool:
        return None
    return y


def _inputs(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def check_batch_mixing(ctx: RuleContext, at: Snapshot, pl_module: pl.LightningModule, batch: Any) -> list[Alert]:
    """``batch_mixing`` when perturbing sample *j* changes the output of another sample.

    The model runs in eval mode (normalization layers use running statistics, dropout is off)
    under ``torch.no_grad``, on the first batch, with samples 0, the middle one and the last one
    perturbed in turn: a model that mixes "forward" along the batch axis (an RNN run over it) is
    seen from sample 0, one that mixes "backward" from the last. Training flags, the RNG state,
    gradients and buffers are left as they were. The check is skipped, silently, if the batch is
    not ``inputs`` or ``(inputs, ...)`` or the forward pass does not accept the inputs alone.
    """
    x = _inputs(batch)
    if x is None or x.dim() == 0 or x.shape[0] < 3:
        return []
    size = x.shape[0]
    flags = {module: module.training for module in pl_module.modules()}
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            pl_module.eval()
            reference = _first_tensor(pl_module(x))
            if reference is None or reference.dim() == 0 or reference.shape[0] != size:
                return []
            if not reference.is_floating_point() or not torch.isfinite(reference).all():
                return []
            scale = reference.abs().max().item() + 1e-12
            worst, worst_j, worst_i = 0.0, -1, -1
            generator = torch.Generator().manual_seed(0)
            for j in sorted({0, size // 2, size - 1}):
                changed = _perturbed(x, j, generator)
                if changed is None:
                    return []
                out = _first_tensor(pl_module(changed))
                if out is None or out.shape != reference.shape:
                    return []
                diff = (out - reference).abs().reshape(size, -1).amax(dim=1) / scale
                diff[j] = 0
                value, index = diff.max(dim=0)
                if value.item() > worst:
                    worst, worst_j, worst_i = value.item(), j, index.item()
    except Exception:  # an odd forward signature: the check does not apply
        return []
    finally:
        for module, flag in flags.items():
            module.training = flag
    threshold = ctx.setting("batch_mixing", "threshold")
    if worst <= threshold:
        return []
    return [
        ctx.alert(
            "batch_mixing",
            at,
            None,
            worst,
            threshold,
            f"Changing sample {worst_j} of the batch changed the model's output for sample {worst_i} (relative change "
            f"{worst:.2g}, in eval mode): samples of a batch influence each other.",
            "Check `batch_first` of RNN/LSTM/GRU/MultiheadAttention/Transformer layers against your tensor layout "
            "(`(batch, seq, feature)` needs `batch_first=True`), and any `view`/`reshape`/`transpose` that moves the "
            "batch dimension.",
            severity="error",
            perturbed_sample=worst_j,
            affected_sample=worst_i,
        )
    ]


def _perturbed(x: Tensor, j: int, generator: torch.Generator) -> Tensor | None:
    changed = x.clone()
    if x.is_floating_point():
        noise = torch.randn(x[j].shape, generator=generator).to(x)
        changed[j] = x[j] + noise * (x.float().std().clamp_min(1e-3).to(x.dtype)) + 1.0
    elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        changed[j] = x[(j + 1) % x.shape[0]]  # another sample's tokens, same vocabulary
    else:
        return None
    return changed


class ForwardRecorder:
    """Records, during one training batch, the forward order of modules and BatchNorm batch sizes."""

    def __init__(self, model: nn.Module) -> None:
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.batch_norm: dict[str, tuple[int, bool]] = {}  # name -> (samples, synchronized)
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, module)) for name, module in model.named_modules() if name
        ]

    def _hook(self, name: str, module: nn.Module):
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)

        def hook(mod: nn.Module, args: tuple) -> None:
            if name not in self.batch_norm and is_bn and mod.training and args and isinstance(args[0], Tensor):
                self.batch_norm[name] = (int(args[0].shape[0]), isinstance(mod, nn.SyncBatchNorm))
            if name not in self._seen:
                self._seen.add(name)
                self.order.append(name)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_batch_norm(
    ctx: RuleContext, at: Snapshot, recorded: Mapping[str, tuple[int, bool]], world_size: int
) -> list[Alert]:
    """``small_batch_norm`` when a BatchNorm normalizes over fewer than ``threshold`` samples."""
    threshold = ctx.setting("small_batch_norm", "threshold")
    small = {}
    for name, (samples, synced) in recorded.items():
        effective = samples * world_size if synced else samples
        if effective < threshold:
            small[name] = effective
    if not small:
        return []
    first = next(iter(small))
    return [
        ctx.alert(
            "small_batch_norm",
            at,
            first,
            float(small[first]),
            float(threshold),
            f"{len(small)} BatchNorm layer(s) (first: {first}) normalize over only {small[first]} sample(s) per "
            "step: batch statistics that noisy make training unstable and eval behave differently.",
            "Use a larger batch per device, `nn.SyncBatchNorm.convert_sync_batchnorm(model)` under DDP, or a "
            "batch-independent normalization: GroupNorm, InstanceNorm or LayerNorm.",
            modules=list(small),
        )
    ]


def check_seed(ctx: RuleContext, at: Snapshot, accelerated: bool) -> list[Alert]:
    """``unseeded_run`` (info) when no seed was set, or a GPU run is not deterministic."""
    seeded = "PL_GLOBAL_SEED" in os.environ or torch.initial_seed() < 2**32
    # an unseeded process draws a random 64-bit seed: a seed below 2**32 was set by hand
    if seeded and (not accelerated or torch.are_deterministic_algorithms_enabled()):
        return []
    what = "not deterministic" if seeded else "not seeded"
    return [
        ctx.alert(
            "unseeded_run",
            at,
            None,
            0.0,
            0.0,
            f"The run is {what}: two runs of the same code will differ.",
            "Call `lightning.seed_everything(42, workers=True)` before building the model and data, and pass "
            "`Trainer(deterministic=True)` for bit-identical runs.",
            severity="info",
        )
    ]
