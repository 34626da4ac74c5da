"""One-time checks at the start of fit: data order, batch mixing, small BatchNorm batches, seeding.

These run once (a few host reads and, for batch mixing, four extra forward passes of the first
batch under ``torch.no_grad``), so unlike the snapshot rules they may look at tensor values.
Each returns alerts through a :class:`~lightning_watch.alerts.rules.RuleContext` so that they
share the rules' settings and alert format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler

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


def _sequential(sampler: Any) -> bool:
    if isinstance(sampler, SequentialSampler):
        return True
    # under DDP Lightning swaps in a DistributedSampler that keeps the original choice
    return isinstance(sampler, DistributedSampler) and not sampler.shuffle


def _reads_in_order(loader: DataLoader) -> bool:
    """Whether a map-style loader's batches come in a fixed order (only what its samplers tell for sure)."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None or (type(batch_sampler) is BatchSampler and batch_sampler.sampler is sampler):
        return _sequential(sampler)
    # A `batch_sampler=` of the user's: `loader.sampler` is then a SequentialSampler placeholder,
    # and the batch sampler decides the order. Judge the sampler it draws from, or its `shuffle`
    # flag; a batch sampler with neither (a bucketing sampler) is left to the label-run check.
    inner = getattr(batch_sampler, "sampler", None)
    if inner is not None:
        return _sequential(inner)
    return getattr(batch_sampler, "shuffle", None) is False


def _order_is_by_design(loader: DataLoader) -> bool:
    """Whether reading in order is harmless or intended for this loader (no ``unshuffled_data`` then).

    - One batch holds the whole data set (full-batch training: L-BFGS, a graph's nodes): shuffling would
      only permute the rows of that batch, which a mean loss does not see.
    - ``batch_size=None``: the data set's items are batches the user built (pytorch/examples
      word_language_model's ``get_batch``: consecutive bptt-long chunks of one text stream, read in
      order because the hidden state is carried from one to the next), so their order is the design.
      Sorted labels inside such batches are still seen by the label-run check.
    """
    if loader.batch_size is None and loader.batch_sampler is None:
        return True
    try:
        return len(loader) == 1
    except TypeError:  # a sampler without a length
        return False


def check_sampler(ctx: RuleContext, at: Snapshot, train_dataloader: Any) -> list[Alert]:
    """``unshuffled_data`` when a map-style training loader samples in order."""
    out = []
    for loader in _loaders(train_dataloader):
        if isinstance(loader.dataset, IterableDataset):
            continue  # order is the data set's business: judged by label runs instead
        if _reads_in_order(loader) and len(loader.dataset) > 1 and not _order_is_by_design(loader):
            sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
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
        labels = batch_labels(batch)
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


def _label_vector(y: Any) -> Tensor | None:
    if not isinstance(y, Tensor) or y.dim() != 1 or y.numel() < 2:
        return None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return None
    return y


def batch_labels(batch: Any) -> Tensor | None:
    """The integer label vector of an ``(inputs, labels, ...)`` batch, if there is one.

    In an ``(ids, lengths, labels)`` batch the second element holds sequence lengths (every value
    between 1 and the padded length of ``ids``), and the labels come third.
    """
    if isinstance(batch, Mapping):
        batch = [batch.get("x"), batch.get("y", batch.get("label", batch.get("labels")))]
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        return None
    y = _label_vector(batch[1])
    if y is not None and len(batch) >= 3 and _label_vector(batch[2]) is not None and _are_lengths(batch[0], y):
        y = _label_vector(batch[2]) if len(batch[2]) == len(y) else y
    return y if y is not None and _one_per_sample(batch[0], y) else None


def _one_per_sample(x: Any, y: Tensor) -> bool:
    """``y`` holds one entry per sample of ``x``: its length is ``x``'s batch dimension (0, or 1 if time-major).

    A language model's flattened ``(seq * batch,)`` next-token targets (pytorch/examples
    word_language_model) are not class labels: their imbalance is the words' (Zipf's law), not a fault.
    When the inputs are not one tensor the labels are taken as they are.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        return True
    return len(y) == x.shape[0] or (x.dim() >= 2 and len(y) == x.shape[1])


def _are_lengths(x: Any, y: Tensor) -> bool:
    """``y`` looks like the lengths of the padded sequences in ``x``: 1 <= y <= a sequence dim of ``x``."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        return False
    if len(y) == x.shape[0]:
        seq = x.shape[1]  # (batch, seq, ...)
    elif len(y) == x.shape[1]:
        seq = x.shape[0]  # time-major (seq, batch, ...)
    else:
        return False
    # a one-time host read of the first batches' vector
    low, high = int(y.min()), int(y.max())
    return low >= 1 and high <= seq and high > 1


def _inputs(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None


def first_tensor(obj: Any, keep: Callable[[Tensor], bool] = lambda t: True) -> Tensor | None:
    """The first tensor in ``obj`` (tensors, tuples, lists, dicts, depth first) that ``keep`` accepts."""
    if isinstance(obj, Tensor):
        return obj if keep(obj) else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = first_tensor(item, keep)
            if found is not None:
                return found
    return None


def check_batch_mixing(ctx: RuleContext, at: Snapshot, pl_module: pl.LightningModule, batch: Any) -> list[Alert]:
    """``batch_mixing`` when perturbing sample *j* changes the output of another sample.

    The model runs in eval mode (normalization layers use running statistics, dropout is off)
    under ``torch.no_grad``, on the first batch, with samples 0, the middle one and the last one
    perturbed in turn: a model that mixes "forward" along the batch axis (an RNN run over it) is
    seen from sample 0, one that mixes "backward" from the last.

    The batch dimension is found, not assumed: it is the dimension of the labels' length when
    that singles one out, else dimension 0 and, for time-major inputs (``(seq, batch, ...)`` or
    integer ``(seq, batch)`` tokens), dimension 1 as well; samples must be independent along at
    least one candidate. Every forward starts from the same RNG state, so a forward that samples
    noise (a VAE) draws the same noise each time; one that still differs from itself unperturbed
    is stochastic in a way the check cannot control and is skipped. Training flags, the RNG
    state, gradients and buffers are left as they were. The check is skipped, silently, if the
    batch is not ``inputs`` or ``(inputs, ...)`` or the forward pass does not accept the inputs alone.
    """
    x = _inputs(batch)
    if x is None or x.dim() == 0 or x.shape[0] < 3:
        return []
    threshold = ctx.setting("batch_mixing", "threshold")
    flags = {module: module.training for module in pl_module.modules()}
    devices = [x.device] if x.device.type == "cuda" else []
    worst = None
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            pl_module.eval()
            rng = _rng_state(x.device)

            def run(inputs: Tensor) -> Tensor | None:
                _set_rng_state(x.device, rng)
                return first_tensor(pl_module(inputs))

            reference = run(x)
            if reference is None or reference.dim() == 0 or not reference.is_floating_point():
                return []
            if not torch.isfinite(reference).all():
                return []
            scale = reference.abs().max().item() + 1e-12
            again = run(x)
            if again is None or again.shape != reference.shape:
                return []
            if (again - reference).abs().max().item() / scale > threshold:
                return []  # stochastic even from one RNG state: its differences prove nothing
            generator = torch.Generator().manual_seed(0)
            for dim in _batch_dims(x, reference, batch_labels(batch)):
                found = _mixing_along(x, dim, reference, scale, run, generator)
                if found is None:
                    return []
                if found[0] <= threshold:
                    return []  # samples are independent along this dimension: it is the batch's
                if worst is None or found[0] > worst[0]:
                    worst = (*found, dim)
    except Exception:  # an odd forward signature: the check does not apply
        return []
    finally:
        for module, flag in flags.items():
            module.training = flag
    if worst is None:
        return []
    value, worst_j, worst_i, dim = worst
    where = f" (batch dimension {dim})" if dim else ""
    return [
        ctx.alert(
            "batch_mixing",
            at,
            None,
            value,
            threshold,
            f"Changing sample {worst_j} of the batch{where} changed the model's output for sample {worst_i} "
            f"(relative change {value:.2g}, in eval mode): samples of a batch influence each other.",
            "Check `batch_first` of RNN/LSTM/GRU/MultiheadAttention/Transformer layers against your tensor layout "
            "(`(batch, seq, feature)` needs `batch_first=True`), and any `view`/`reshape`/`transpose` that moves the "
            "batch dimension.",
            severity="error",
            perturbed_sample=worst_j,
            affected_sample=worst_i,
            batch_dim=dim,
        )
    ]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _aligned(x: Tensor, reference: Tensor, dim: int) -> Tensor | None:
    """``reference`` viewed so that its dimension ``dim`` is the inputs' dimension ``dim``, if it can be."""
    if reference.dim() > dim and reference.shape[dim] == x.shape[dim]:
        return reference
    if x.dim() >= 2 and reference.dim() >= 1 and reference.shape[0] == x.shape[0] * x.shape[1] != x.shape[0]:
        return reference.reshape(x.shape[0], x.shape[1], *reference.shape[1:])  # outputs flattened to (seq*batch, ...)
    return None


def _batch_dims(x: Tensor, reference: Tensor, labels: Tensor | None) -> list[int]:
    """Candidate batch dimensions of ``x``: those along which the output is laid out like the inputs."""
    dims = [0]
    # dimension 1 for time-major layouts only: in a float (batch, features) input it is the features
    if x.dim() >= 3 or (x.dim() == 2 and not x.is_floating_point()):
        dims.append(1)
    dims = [d for d in dims if x.shape[d] >= 3 and _aligned(x, reference, d) is not None]
    if labels is not None:
        matching = [d for d in dims if x.shape[d] == len(labels)]
        if len(matching) == 1:
            return matching  # one label per sample: the batch is where the labels are
    return dims


def _mixing_along(x: Tensor, dim: int, reference: Tensor, scale: float, run, generator: torch.Generator):
    """``(relative change, perturbed j, affected i)``: the largest change of another sample's output."""
    size = x.shape[dim]
    expected = _aligned(x, reference, dim)
    worst, worst_j, worst_i = 0.0, -1, -1
    for j in sorted({0, size // 2, size - 1}):
        changed = _perturbed(x, dim, j, generator)
        if changed is None:
            return None
        out = run(changed)
        if out is None or out.shape != reference.shape:
            return None
        out = _aligned(x, out, dim)
        diff = (out - expected).abs().movedim(dim, 0).reshape(size, -1).amax(dim=1) / scale
        diff[j] = 0
        value, index = diff.max(dim=0)
        if value.item() > worst:
            worst, worst_j, worst_i = value.item(), j, index.item()
    return worst, worst_j, worst_i


def _perturbed(x: Tensor, dim: int, j: int, generator: torch.Generator) -> Tensor | None:
    changed = x.clone()
    target = changed.select(dim, j)
    if x.is_floating_point():
        noise = torch.randn(target.shape, generator=generator).to(x)
        target.copy_(x.select(dim, j) + noise * (x.float().std().clamp_min(1e-3).to(x.dtype)) + 1.0)
    elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        target.copy_(x.select(dim, (j + 1) % x.shape[dim]))  # another sample's tokens, same vocabulary
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
