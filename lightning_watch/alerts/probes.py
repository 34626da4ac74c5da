"""What the alert engine measures beyond the monitors: inputs, the model's output, gradient hygiene, unit symmetry.

Each probe is a :class:`~lightning_watch.hub.StatSource`: device accumulators filled on sampled
(or logging) steps only and read in the hub's one read of the logging step, so none of them
costs a host sync. They feed the detectors of :mod:`lightning_watch.alerts.detectors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_watch.alerts.checks import batch_labels, first_tensor
from lightning_watch.cadence import Cadence
from lightning_watch.outputs import primary_tensor
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, StateRegistry, constant, l2_norms
from lightning_watch.stats.kernels import cpu_values, local_tensor, reduction_dtype, sum_of_squares


def first_float_tensor(batch: Any) -> Tensor | None:
    """The first non-empty floating-point tensor of a batch (tensors, tuples, lists, dicts), else ``None``."""
    return first_tensor(batch, keep=lambda t: t.is_floating_point() and t.numel() > 0)


class _Probe:
    """Common parts: a key unique in the read, a cadence, declared accumulators."""

    cadence: Cadence | None = None
    #: the snapshot metrics this probe produces: it runs only when an enabled detector requires one
    PRODUCES: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.key = f"{type(self).__name__}@{id(self):x}"
        self.state = StateRegistry()

    def collect(self) -> StatBlock:
        return self.state.block(self.key) if self.state.allocated else StatBlock()

    def reset(self) -> None:
        self.state.reset()

    def histograms(self) -> dict[str, Tensor]:
        return {}

    def _values(self, values: Mapping[str, Any], name: str) -> Any:
        return values.get(f"{self.key}.{name}")


class _HookedProbe(_Probe):
    """A probe that measures through hooks it puts on the model for one batch (``arm``) and takes off."""

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[RemovableHandle] = []

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class InputProbe(_Probe):
    """Scale of the training inputs: mean, std and max-abs of the logging batch's first float tensor (one per window).

    Logged Metrics:
        ``watch.global/input_mean``, ``watch.global/input_std``, ``watch.global/input_max_abs``.

    Example:
        >>> probe = InputProbe(); probe.start(Cadence(log=1, sample=1), torch.device("cpu"))
        >>> probe.observe((torch.full((4, 3), 255.0), torch.zeros(4)))
        >>> from lightning_watch.stats import read_blocks
        >>> snap = Snapshot(step=0, epoch=0); probe.finalize(read_blocks([probe.collect()]), snap)
        >>> snap.get("input_mean"), snap.get("input_std")
        (255.0, 0.0)
    """

    PRODUCES = ("input_mean", "input_std", "input_max_abs")

    def start(self, cadence: Cadence, device: torch.device) -> None:
        self.cadence = cadence
        self.state.clear()
        self.state.declare("sums", (2,), reduce="sum")  # sum, sum of squares
        self.state.declare("high", (1,), reduce="max")  # max |x|
        self.state.declare("count", (1,), reduce="sum", host=True)
        self.state.allocate(device)

    def observe(self, batch: Any) -> None:
        x = first_float_tensor(batch)
        if x is None or not self.state.allocated:
            return
        x = local_tensor(x).detach()
        dtype = reduction_dtype([x])
        self.state["sums"].add_(torch.stack([x.sum(dtype=dtype), sum_of_squares(x, dtype)]))
        torch.maximum(self.state["high"], x.abs().amax().to(self.state["high"].dtype), out=self.state["high"])
        self.state["count"][0] += x.numel()

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        count = (self._values(values, "count") or [0])[0]
        if not count:
            return
        total, squares = self._values(values, "sums")
        mean = total / count
        snapshot.put("input_mean", mean)
        snapshot.put("input_std", max(squares / count - mean * mean, 0.0) ** 0.5)
        snapshot.put("input_max_abs", self._values(values, "high")[0])


class LabelProbe(_Probe):
    """How often each class appears among the training labels (sampled batches, the whole fit).

    Labels are counted on the device (``index_add_``, no sync) into :data:`MAX_CLASSES` bins; the
    counts are not reset between windows, so the histogram covers every sampled batch of the fit.

    Logged Metrics:
        ``watch.global/label_rarest_share`` (the rarest class's share of the labels over its share if
        all classes were equally frequent; 1 is balanced), ``watch.global/label_classes``,
        ``watch.global/label_count``; the same with the suffix ``_seen`` over 1 + the largest label seen;
        ``watch.global/label_mean_square`` (the mean of the squared labels).
    """

    PRODUCES = (
        "label_rarest_share",
        "label_classes",
        "label_count",
        "label_rarest_share_seen",
        "label_classes_seen",
        "label_count_seen",
        "label_mean_square",
    )

    MAX_CLASSES = 1024

    def start(self, cadence: Cadence, device: torch.device) -> None:
        self.cadence = cadence
        self.state.clear()
        self.state.declare("counts", (self.MAX_CLASSES,), reduce="sum")
        self.state.allocate(device)

    def observe(self, batch: Any) -> None:
        y = batch_labels(batch)
        if y is None or not self.state.allocated or y.dim() != 1 or y.is_floating_point():
            return
        y = local_tensor(y).detach()
        counts = self.state["counts"]
        if y.device != counts.device:
            return
        counts.index_add_(0, y.clamp(0, self.MAX_CLASSES - 1), torch.ones_like(y, dtype=counts.dtype))

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        counts = self._values(values, "counts")
        if not counts:
            return
        # two class counts: the output's last dimension (a C-way classifier's) and 1 + the largest label
        # seen; the detector decides which applies (a VAE's 64 outputs are pixels, not 64 classes).
        # One pass over the bins finds the labels seen; the rest works on those (a few, of 1024 bins).
        present = [(i, c) for i, c in enumerate(counts) if c > 0]
        seen = 1 + present[-1][0] if present else 0
        outputs = int(snapshot.get("output_classes", default=0.0))
        if seen >= 2:  # the labels' mean square: the scale of a loss that regresses them
            snapshot.put("label_mean_square", sum(c * i * i for i, c in present) / sum(c for _, c in present))
        for suffix, classes in (("", outputs or seen), ("_seen", seen)):
            if classes < 2 or classes >= self.MAX_CLASSES:
                continue
            within = [c for i, c in present if i < classes]
            total = sum(within)
            if not total:
                continue
            # a class below `classes` with no label at all is the rarest, with a share of 0
            rarest = min(within) if len(within) == classes else 0.0
            snapshot.put("label_rarest_share" + suffix, rarest / total * classes)
            snapshot.put("label_classes" + suffix, float(classes))
            snapshot.put("label_count" + suffix, total)

    def reset(self) -> None:
        pass  # the histogram covers the whole fit


class OutputProbe(_HookedProbe):
    """The model's own output (the LightningModule's ``forward``) on logging steps (one batch per window).

    Measures what a classification head should not look like: the share of exactly-zero values
    (a ReLU on the logits), the share of rows that are probability vectors (a softmax before a
    loss that applies its own), and the size of the last dimension (the number of classes).

    Logged Metrics:
        ``watch.global/output_zero_frac``, ``watch.global/output_prob_rows``, ``watch.global/output_classes``,
        ``watch.global/output_width`` (the output's last dimension, also when it is 1: a regression head),
        ``watch.global/output_rows`` (rows of the measured output, ``(N, C)``: the batch size).
    """

    PRODUCES = ("output_zero_frac", "output_prob_rows", "output_classes", "output_width", "output_rows")

    def __init__(self) -> None:
        super().__init__()
        self._last: Tensor | None = None
        self._classes = 0
        self._width = self._seen_width = 0  # last dimension of the output, also for one-column outputs

    def start(self, cadence: Cadence, device: torch.device) -> None:
        self.cadence = cadence
        self.state.clear()
        self.state.declare("sums", (2,), reduce="sum")  # zeros, probability rows
        self.state.declare("count", (2,), reduce="sum", host=True)  # elements, rows
        self.state.allocate(device)
        self._width = self._seen_width = 0

    def arm(self, model: nn.Module) -> None:
        """Watch this batch's forward: the output of the model, or of its last top-level child to finish.

        ``training_step`` may call ``self(x)`` or ``self.net(x)``; whichever of them finishes last
        in the batch holds the model's output. Hooks exist on logging batches only.
        """
        self.disarm()
        if self.state.allocated:
            self._handles = [m.register_forward_hook(self._hook) for m in (model, *model.children())]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        y = primary_tensor(output)
        if y is None or not y.is_floating_point() or y.dim() < 1:
            return
        # the width of whatever finished last: 1 for a regression head, (N, 1) or (N,)
        self._width = y.shape[-1] if y.dim() >= 2 else 1
        if y.dim() >= 2 and y.shape[-1] >= 2:
            self._last = local_tensor(y).detach()

    def measure(self) -> None:
        """Measure the output kept by the hooks (the end of a logging batch)."""
        self.disarm()
        y, self._last = self._last, None
        self._seen_width, self._width = self._width or self._seen_width, 0
        if y is None or not self.state.allocated:
            return
        rows = y.reshape(-1, y.shape[-1])
        in_unit = ((rows >= 0) & (rows <= 1)).all(dim=1)
        sums_to_one = (rows.sum(dim=1, dtype=torch.float32) - 1).abs() < 1e-3
        stats = torch.stack([(rows == 0).sum(dtype=torch.float64), (in_unit & sums_to_one).sum(dtype=torch.float64)])
        self.state["sums"].add_(stats.to(self.state["sums"].dtype))
        self.state["count"][0] += rows.numel()
        self.state["count"][1] += rows.shape[0]
        self._classes = rows.shape[1]

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        if self._seen_width and self.state.allocated:
            snapshot.put("output_width", float(self._seen_width))
        counts = self._values(values, "count") or [0, 0]
        if not counts[1]:
            return
        zeros, prob_rows = self._values(values, "sums")
        snapshot.put("output_zero_frac", zeros / counts[0])
        snapshot.put("output_prob_rows", prob_rows / counts[1])
        snapshot.put("output_classes", float(self._classes))
        snapshot.put("output_rows", counts[1])


class GradientHygiene(_Probe):
    """Two invariants of the gradients the optimizers step.

    - **Zeroed between two steps** (TrainCheck's invariant, per optimizer): between two
      steps of an optimizer, its gradients must be zero (or ``None``) at some backward,
      else they pile up across steps (a forgotten ``optimizer.zero_grad()`` under manual
      optimization). Per optimizer, so a GAN's discriminator, whose gradients are still there
      when the generator backpropagates through it and are zeroed before its own backward, is
      clean. Checked on logging steps (where it is judged): ``None`` gradients are known on the
      host for free; otherwise one fused norm per optimizer, kept on the device.
    - **Every parameter gets a gradient**: at the logging step, parameters an optimizer holds
      that require a gradient but have none (``None``, or exactly zero) are cut off from the loss
      (a ``.detach()`` in ``forward``, an unused layer).

    Logged Metrics:
        ``watch.global/grads_not_zeroed`` (1 when a logging step's backward started from stale gradients),
        ``watch.global/params_without_grad`` (share of the optimizers' trainable elements without
        a gradient), ``watch.grad_missing/<NN>.<module>`` (1 for a module none of whose trainable
        parameters got a gradient).
    """

    PRODUCES = ("grads_not_zeroed", "params_without_grad", "grad_missing")

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[Any] = []
        self._judging: list[Any] = []  # the pre-step hooks of a checked batch
        self._automatic = False
        self._modules: list[tuple[str, list[nn.Parameter]]] = []
        self._missing: dict[str, float] = {}  # module -> 1.0, this window (host knowledge)
        self._clean: dict[int, Any] = {}
        self._observed: dict[int, bool] = {}
        self._checked_now = False

    def start(
        self,
        cadence: Cadence,
        device: torch.device,
        model: nn.Module,
        optimizers: Sequence[Optimizer],
        automatic: bool = False,
    ) -> None:
        """``automatic``: Lightning steps the one optimizer (automatic optimization), so the trainer's step
        count tells when it stepped (:meth:`before_backward`'s ``optimizer_steps``) and no hook runs per step."""
        self.cadence = cadence
        self.state.clear()
        self.state.declare("stale", (1,), reduce="max")
        self.state.declare("without", (2,), reduce="max")  # elements without gradient, trainable elements
        self.state.allocate(device)
        self.stop()
        # Under manual optimization a post-step hook (one call per step) tells that an optimizer stepped;
        # the pre-step hook that judges is there only on checked batches (before_backward to end_batch).
        self._automatic = automatic and len(optimizers) == 1
        if not self._automatic:
            self._handles = [opt.register_step_post_hook(self._after_step) for opt in optimizers]
        self._optimizers = list(optimizers)
        self._owner = {id(p): name for name, module in model.named_modules() for p in module.parameters(recurse=False)}

    def stop(self) -> None:
        for handle in self._handles + self._judging:
            handle.remove()
        self._handles, self._judging = [], []
        self._optimizers = []
        # per optimizer (by id): zeroed at a checked backward since its last step (a device bool), and
        # whether a checked backward was seen since that step
        self._clean: dict[int, Any] = {}
        self._observed: dict[int, bool] = {}
        self._checked_now = False
        self._steps_seen: int | None = None  # automatic optimization: the step count of the last checked backward

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._clean[id(optimizer)] = None
        self._observed[id(optimizer)] = False

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # a checked step of an optimizer that stepped before: were its gradients ever zero in between?
        if not self._checked_now or not self._observed.get(id(optimizer)) or not self.state.allocated:
            return
        stale = self.state["stale"]
        dirty = (~self._clean[id(optimizer)]).to(device=stale.device, dtype=stale.dtype)
        torch.maximum(stale, dirty, out=stale)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for opt in self._optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad]

    def before_backward(self, checked: bool, optimizer_steps: int = 0) -> None:
        """Lightning is about to backpropagate: note, per optimizer that stepped, whether its gradients are zero.

        ``checked``: whether this step is one the invariant is checked on (the logging step);
        ``optimizer_steps``: the trainer's step count (read under automatic optimization only).
        """
        self._checked_now = checked
        if not checked or not self.state.allocated:
            return
        if self._automatic and optimizer_steps != self._steps_seen:
            # the optimizer stepped since the last checked backward (what the post-step hook tells otherwise)
            self._steps_seen = optimizer_steps
            if optimizer_steps > 0:
                self._after_step(self._optimizers[0], (), {})
        if not self._judging and not self._automatic:
            # a manual `opt.step()` runs its pre-step hooks after this backward; under automatic
            # optimization they run before the closure that backpropagates, so Lightning's
            # `on_before_optimizer_step` (:meth:`before_optimizer_step`) judges instead
            self._judging = [opt.register_step_pre_hook(self._before_step) for opt in self._optimizers]
        for opt in self._optimizers:
            if id(opt) not in self._observed:
                continue  # never stepped: its first gradients may be there (accumulation)
            grads = [
                local_tensor(p.grad)
                for g in opt.param_groups
                for p in g["params"]
                if p.requires_grad and p.grad is not None
            ]
            if grads:
                clean = torch.stack(l2_norms(grads)).amax() == 0
            else:  # zeroed with set_to_none (the default): known on the host, no kernel
                clean = torch.ones((), dtype=torch.bool, device=self.state["stale"].device)
            previous = self._clean.get(id(opt))
            self._clean[id(opt)] = clean if previous is None else previous | clean.to(previous.device)
            self._observed[id(opt)] = True

    def end_batch(self) -> None:
        """A checked batch is over: the optimizer steps of the quiet batches that follow are not judged."""
        self._checked_now = False
        for handle in self._judging:
            handle.remove()
        self._judging = []

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """On the logging step: which trainable parameters of ``optimizer`` got no gradient (and, under
        automatic optimization, whether its backward started from zeroed gradients)."""
        if not self.state.allocated:
            return
        if self._automatic:
            self._before_step(optimizer, (), {})
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            return
        with_grad = [p for p in params if p.grad is not None]
        none_numel = sum(p.numel() for p in params if p.grad is None)
        for p in params:
            if p.grad is None:
                self._missing[self._owner.get(id(p), "?")] = 1.0
        zero_numel = torch.zeros((), dtype=self.state["without"].dtype, device=self.state["without"].device)
        # a sharded gradient is judged by this rank's shard only when the parameter is not sharded
        with_grad = [p for p in with_grad if local_tensor(p.grad) is p.grad]
        if with_grad:
            norms = torch.stack(l2_norms([p.grad for p in with_grad]))
            # the same parameters' element counts on every logging step: made on the device once
            sizes = constant(tuple(float(p.numel()) for p in with_grad), zero_numel.dtype, norms.device)
            zero_numel = ((norms == 0).to(zero_numel.dtype) * sizes).sum()
        trainable = constant(float(sum(p.numel() for p in params)), zero_numel.dtype, zero_numel.device)
        row = torch.stack([zero_numel + none_numel, trainable])
        torch.maximum(self.state["without"], row, out=self.state["without"])

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        stale = self._values(values, "stale")
        if stale is not None:
            snapshot.put("grads_not_zeroed", max(stale[0], 0.0))  # -inf: nothing was checked in the window
        without = self._values(values, "without")
        if without is not None and without[1] > 0:
            snapshot.put("params_without_grad", without[0] / without[1])
        for module, flag in self._missing.items():
            snapshot.put("grad_missing", flag, module)

    def reset(self) -> None:
        super().reset()
        self._missing = {}


#: a relative unit spread above which a layer's units differ for good (``symmetric_units`` fires at 1e-6)
SETTLED_SPREAD = 1e-3


class UnitSymmetry(_Probe):
    """Whether the units of a layer are copies of each other (weights initialised to a constant).

    At the logging step, per ``nn.Linear``/``nn.ConvNd`` layer with two or more output units: the
    largest spread between units, ``max over inputs of (max over units - min over units)``,
    relative to the weight's largest magnitude. Exactly 0 means every unit computes the same
    function, and gradient descent keeps it so. Two small reductions per layer, no copy.

    Once every layer's spread is above :data:`SETTLED_SPREAD` at a read, the probe stops: units that
    differ stay different (gradient descent cannot make them identical again), so a healthy model
    pays for this probe on its first logging step only.

    Logged Metrics:
        ``watch.unit_spread/<NN>.<module>``, until every layer's units differ.
    """

    PRODUCES = ("unit_spread",)
    settled = False  # every layer's units differ: nothing left to measure in this fit

    def start(self, cadence: Cadence, device: torch.device, model: nn.Module) -> None:
        self.cadence = cadence
        self._layers = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            and isinstance(getattr(module, "weight", None), nn.Parameter)
            and module.weight.dim() >= 2
            and module.weight.shape[0] > 1
            and not torch.is_complex(module.weight)
            and not hasattr(module, "parametrizations")
            # a sharded weight's units live on several ranks: comparing them would need a gather
            and local_tensor(module.weight) is module.weight
        ]
        self.state.clear()
        self.state.declare("spread", (len(self._layers),), reduce="max")
        self.state.allocate(device)
        self.settled = False

    def collect(self) -> StatBlock:
        if self.settled:  # decided from a read's values, the same on every rank: the reads stay alike
            return StatBlock()
        self._measure()  # the weights as they are at this logging step
        return super().collect()

    def _measure(self) -> None:
        if not self.state.allocated or not self._layers:
            return
        rows = []
        for _, module in self._layers:
            w = module.weight.detach().reshape(module.weight.shape[0], -1)
            high, low = w.amax(dim=0), w.amin(dim=0)  # per input, over units: two passes, no temporary
            rows.append(torch.stack([(high - low).amax(), high.amax(), low.amin()]).float())
        extremes = torch.stack(rows)  # (layers, 3): spread, max w, min w; the rest is one vector for all layers
        spread, scale = extremes[:, 0], torch.maximum(extremes[:, 1], -extremes[:, 2])  # max |w|
        relative = torch.where(scale > 0, spread / scale, torch.ones_like(scale))
        self.state["spread"].copy_(relative.to(self.state["spread"].dtype))

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        spreads = self._values(values, "spread")
        if not spreads:
            return
        for (name, _), spread in zip(self._layers, spreads):
            snapshot.put("unit_spread", spread, name)
        self.settled = all(spread > SETTLED_SPREAD for spread in spreads)

    def reset(self) -> None:
        pass  # measured afresh at each logging step


class LossTrend(_Probe):
    """The slope of the training loss within each logging window (least squares over sampled steps).

    The window's mean loss says where the loss is; its slope says where it is going. A fit shorter
    than two windows has no other trend. On sampled steps only: five sums on the device, no sync.

    Logged Metrics:
        ``watch.global/loss_slope`` (loss change per step), ``watch.global/loss_slope_points``
        (sampled losses it was fitted on).

    Example:
        >>> trend = LossTrend(); trend.start(Cadence(log=10, sample=1), torch.device("cpu"))
        >>> for step in range(10): trend.observe(step, torch.tensor(5.0 - 0.5 * step))
        >>> from lightning_watch.stats import read_blocks
        >>> snap = Snapshot(step=9, epoch=0); trend.finalize(read_blocks([trend.collect()]), snap)
        >>> round(snap.get("loss_slope"), 6), snap.get("loss_slope_points")
        (-0.5, 10.0)
    """

    PRODUCES = ("loss_slope", "loss_slope_points")

    def start(self, cadence: Cadence, device: torch.device, host: bool | None = None) -> None:
        """``host``: keep the sums as host numbers (default: on the CPU, where reading a loss costs no sync)."""
        self.cadence = cadence
        self.state.clear()
        # A CPU loss is read for free (no device to wait for): its sums are kept on the host, so a sampled
        # step costs no kernel; on an accelerator they stay on the device and a sampled step never syncs.
        self._on_host = device.type == "cpu" if host is None else host
        # n, sum t, sum t^2, sum L, sum tL, with t relative to the window's first sampled step (well conditioned)
        self.state.declare("sums", (5,), reduce="sum", dtype=torch.float64, host=self._on_host)
        self.state.allocate(device)
        self._origin: int | None = None

    def observe(self, step: int, loss: Tensor) -> None:
        """A sampled step's loss (a finite scalar tensor; non-finite losses are the guard's business)."""
        if not self.state.allocated:
            return
        if self._origin is None:
            self._origin = step
        sums = self.state["sums"]
        t = float(step - self._origin)
        loss = local_tensor(loss).detach()
        if isinstance(sums, list):
            value = cpu_values(loss)[0]
            if math.isfinite(value):
                for i, term in enumerate((1.0, t, t * t, value, value * t)):
                    sums[i] += term
            return
        value = loss.reshape(()).to(device=sums.device, dtype=sums.dtype)
        row = torch.stack([torch.ones_like(value), value.new_tensor(t), value.new_tensor(t * t), value, value * t])
        sums.add_(torch.where(torch.isfinite(value), row, torch.zeros_like(row)))

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        sums = self._values(values, "sums")
        if not sums:
            return
        n, st, stt, sl, stl = sums
        spread = n * stt - st * st
        if n >= 3 and spread > 0:
            snapshot.put("loss_slope", (n * stl - st * sl) / spread)
            snapshot.put("loss_slope_points", n)

    def reset(self) -> None:
        super().reset()
        self._origin = None


#: dropout layers, by their base classes (``nn.Dropout``, ``Dropout1d/2d/3d``, the alpha dropouts)
_DROPOUT = (nn.modules.dropout._DropoutNd,)


class ModelFacts(_Probe):
    """Facts of the model's structure, restated in every snapshot: dropout rates and frozen layers.

    Found once at the start of fit (no device work at all); the detectors judge them together
    with what training does (the loss), and the forward order of the first batch.

    Logged Metrics:
        ``watch.dropout_p/<NN>.<module>`` (the drop probability of each dropout layer),
        ``watch.frozen/<NN>.<module>`` (1 for a module whose own parameters all have
        ``requires_grad=False``, 0 for one whose parameters train).

    Example:
        >>> facts = ModelFacts(); model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.9), nn.Linear(2, 2))
        >>> _ = model[0].requires_grad_(False); facts.start(Cadence(log=1, sample=1), torch.device("cpu"), model)
        >>> snap = Snapshot(step=0, epoch=0); facts.finalize({}, snap)
        >>> snap.modules("dropout_p"), snap.modules("frozen")
        ({'1': 0.9}, {'0': 1.0, '2': 0.0})
    """

    PRODUCES = ("dropout_p", "frozen")

    def start(self, cadence: Cadence, device: torch.device, model: nn.Module) -> None:
        self.cadence = cadence
        self._dropout: dict[str, float] = {}
        self._frozen: dict[str, float] = {}
        for name, module in model.named_modules():
            p = getattr(module, "p", None)
            if isinstance(module, _DROPOUT) and isinstance(p, (int, float)):
                self._dropout[name] = float(p)
            own = [param for param in module.parameters(recurse=False) if param.numel() > 0]
            if own:
                self._frozen[name] = 0.0 if any(param.requires_grad for param in own) else 1.0
        self.started = True

    def collect(self) -> StatBlock:
        return StatBlock()  # nothing on the device

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        if not getattr(self, "started", False):
            return
        for name, p in self._dropout.items():
            snapshot.put("dropout_p", p, name)
        if any(self._frozen.values()):  # the common case, nothing frozen, costs the snapshot nothing
            for name, flag in self._frozen.items():
                snapshot.put("frozen", flag, name)

    def stop(self) -> None:
        self.started = False


#: a gate counts as saturated within 1 % of its range from a bound, as in ``ActivationScaleMonitor``:
#: a sigmoid beyond |z| = ln(99) (below 0.01 or above 0.99), a tanh beyond |z| = atanh(0.98)
SIGMOID_SATURATION = 4.59511985013459
TANH_SATURATION = 2.2975599250672945


class RecurrentGates(_HookedProbe):
    """Saturated gates inside ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (tanh) modules, where no output hook looks.

    A recurrent module computes its gates inside one fused kernel: their pre-activations are no
    module's output. On logging batches a forward hook takes the module's input and its output
    sequence (the hidden state before each step) and recomputes, under ``no_grad``, the first
    layer's gate pre-activations from ``weight_ih_l0``/``weight_hh_l0`` (one matmul of the size of
    the module's own, once per window), then counts those beyond the saturation bounds (the
    forward direction; single-layer modules, since deeper layers' inputs are not visible). A
    ``PackedSequence`` input, projections (``proj_size``) and parametrized weights are skipped.

    Logged Metrics:
        ``watch.gate_saturated_frac/<NN>.<module>``: share of the first layer's gate pre-activations
        in saturation (all gates together).

    Example:
        >>> lstm = nn.LSTM(3, 4); probe = RecurrentGates()
        >>> probe.start(Cadence(log=1, sample=1), torch.device("cpu"), lstm); probe.arm()
        >>> _ = lstm(torch.full((5, 2, 3), 100.0)); probe.disarm()  # raw, huge inputs
        >>> from lightning_watch.stats import read_blocks
        >>> snap = Snapshot(step=0, epoch=0); probe.finalize(read_blocks([probe.collect()]), snap)
        >>> snap.get("gate_saturated_frac", "") > 0.5
        True
    """

    PRODUCES = ("gate_saturated_frac",)

    def __init__(self) -> None:
        super().__init__()
        self._modules: list[tuple[str, nn.RNNBase]] = []

    def start(self, cadence: Cadence, device: torch.device, model: nn.Module) -> None:
        self.cadence = cadence
        self.disarm()
        self._modules = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN))
            and module.num_layers == 1
            and getattr(module, "proj_size", 0) == 0
            and getattr(module, "nonlinearity", "tanh") == "tanh"
            and not hasattr(module, "parametrizations")
            and isinstance(getattr(module, "weight_ih_l0", None), nn.Parameter)
            and local_tensor(module.weight_ih_l0) is module.weight_ih_l0
        ]
        self.state.clear()
        if self._modules:
            self.state.declare("sums", (len(self._modules), 2), reduce="sum")  # saturated, counted
            self.state.allocate(device)

    def arm(self) -> None:
        """Hook the recurrent modules for this batch (logging batches only)."""
        self.disarm()
        if self.state.allocated:
            self._handles = [module.register_forward_hook(self._hook(i)) for i, (_, module) in enumerate(self._modules)]

    def _hook(self, index: int):
        def hook(module: nn.RNNBase, args: Any, output: Any) -> None:
            self.disarm_one(index)
            try:
                with torch.no_grad():
                    counts = _gate_saturation(module, args, output)
            except Exception:  # a shape this probe does not know: measure nothing rather than break training
                return
            if counts is not None:
                row = self.state["sums"][index]
                row.add_(counts.to(device=row.device, dtype=row.dtype))

        return hook

    def disarm_one(self, index: int) -> None:
        # one call per logging batch is enough (a module called again in the batch is not re-measured)
        if index < len(self._handles):
            self._handles[index].remove()

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        sums = self._values(values, "sums")
        if not sums:
            return
        rows = sums if isinstance(sums[0], (list, tuple)) else list(zip(sums[0::2], sums[1::2]))  # (modules, 2)
        for (name, _), (saturated, counted) in zip(self._modules, rows):
            if counted > 0:
                snapshot.put("gate_saturated_frac", saturated / counted, name)


def _gate_saturation(module: nn.RNNBase, args: Any, output: Any) -> Tensor | None:
    """``(saturated, counted)`` gate pre-activations of ``module``'s first layer, forward direction."""
    x = args[0] if args else None
    out = output[0] if isinstance(output, tuple) else output
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or not x.is_floating_point():
        return None  # PackedSequence, or something else
    if x.dim() == 2:  # unbatched (T, F)
        x, out = x.unsqueeze(1), out.unsqueeze(1)
    elif module.batch_first:
        x, out = x.transpose(0, 1), out.transpose(0, 1)  # (T, N, ...)
    hidden = module.hidden_size
    h_seq = out[..., :hidden]  # forward direction
    hx = args[1] if len(args) > 1 else None
    if isinstance(hx, tuple):
        hx = hx[0]
    h0 = hx.reshape(-1, *h_seq.shape[1:])[0] if isinstance(hx, Tensor) else torch.zeros_like(h_seq[0])
    h_prev = torch.cat([h0.unsqueeze(0).to(h_seq.dtype), h_seq[:-1]], dim=0)  # the state each step starts from
    w_ih, w_hh = module.weight_ih_l0, module.weight_hh_l0
    gi = x.to(w_ih.dtype) @ w_ih.t()
    gh = h_prev.to(w_hh.dtype) @ w_hh.t()
    if module.bias:
        gi, gh = gi + module.bias_ih_l0, gh + module.bias_hh_l0
    if isinstance(module, nn.LSTM):  # gates i, f, g, o: sigmoid, sigmoid, tanh, sigmoid
        z = (gi + gh).unflatten(-1, (4, hidden))
        bound = z.new_tensor([SIGMOID_SATURATION, SIGMOID_SATURATION, TANH_SATURATION, SIGMOID_SATURATION])
        saturated = (z.abs() >= bound[:, None]).sum()
    elif isinstance(module, nn.GRU):  # gates r, z (sigmoid), n = tanh(x W_in + r * (h W_hn))
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(ir + hr)
        saturated = (
            ((ir + hr).abs() >= SIGMOID_SATURATION).sum()
            + ((iz + hz).abs() >= SIGMOID_SATURATION).sum()
            + ((in_ + r * hn).abs() >= TANH_SATURATION).sum()
        )
        z = gi
    else:  # nn.RNN, tanh
        z = gi + gh
        saturated = (z.abs() >= TANH_SATURATION).sum()
    saturated = saturated.to(torch.float64)
    return torch.stack([saturated, saturated.new_tensor(float(z.numel()))])  # numel: a host number, no sync


class ValidationInputs(_HookedProbe):
    """Scale of the validation inputs (the first batch of each validation run), next to the training ones.

    Armed when a validation run starts (``on_validation_start``, not the sanity check), it takes the
    first float tensor of the first eval-mode forward call (the model's, or a top-level child's when
    ``validation_step`` calls ``self.net(x)``) and disarms itself; it is removed when the validation
    ends in any case. So no training step pays anything, and the statistics (device sums, no sync)
    are read in the next logging step's one read. They are kept until the next validation.

    Logged Metrics:
        ``watch.global/val_input_mean``, ``watch.global/val_input_std``.
    """

    PRODUCES = ("val_input_mean", "val_input_std")

    def start(self, cadence: Cadence, device: torch.device) -> None:
        self.cadence = cadence
        self.disarm()
        self.state.clear()
        self.state.declare("sums", (3,), reduce="sum")  # count, sum, sum of squares of the latest batch
        self.state.allocate(device)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, model: nn.Module) -> None:
        """Watch the next eval-mode forward (the validation that follows the epoch's last batch)."""
        self.disarm()
        if self.state.allocated:
            self._handles = [m.register_forward_pre_hook(self._hook) for m in (model, *model.children())]

    def _hook(self, module: nn.Module, args: Any) -> None:
        if module.training:
            return  # a training-mode call (a callback's own forward): not validation
        x = first_float_tensor(args)
        if x is None:
            return
        self.disarm()
        x = local_tensor(x).detach()
        dtype = reduction_dtype([x])
        sums = self.state["sums"]
        row = torch.stack([x.new_tensor(float(x.numel()), dtype=dtype), x.sum(dtype=dtype), sum_of_squares(x, dtype)])
        sums.copy_(row.to(sums.dtype))

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        sums = self._values(values, "sums")
        if not sums or not sums[0]:
            return
        count, total, squares = sums
        mean = total / count
        snapshot.put("val_input_mean", mean)
        snapshot.put("val_input_std", max(squares / count - mean * mean, 0.0) ** 0.5)

    def reset(self) -> None:
        pass  # the latest validation's statistics stand until the next validation
