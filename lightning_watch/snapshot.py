"""The plain-float picture of one logging step, shared by writers and alert rules.

Tag layout (what TensorBoard, W&B and MLflow show):

- ``watch.<metric>/<NN>.<module>`` for a per-module value, e.g. ``watch.grad_norm/03.encoder.fc1``;
- ``watch.global/<metric>`` for a whole-model value, e.g. ``watch.global/grad_norm``.

TensorBoard's Scalars tab makes one section per text before the first ``/``, so every metric gets
its own section (``watch.dead_frac``, ``watch.grad_norm``, ...) and the whole-model curves share
``watch.global``. Within a section TensorBoard sorts charts by name; ``NN`` is the module's position
in the model's registration order (``named_modules()``, which is forward order for most models),
zero-padded, so the charts read from the input layer to the output layer. The index is only for
sorting: :func:`parse_tag` drops it, and reads the older ``watch/<metric>/<module>`` and
``watch/global/<metric>`` layout too, so logs of earlier versions stay readable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Prefix of every scalar tag lightning_watch writes (``watch.<metric>/...``).
TAG_PREFIX = "watch"
#: Section of the whole-model values.
GLOBAL_SECTION = f"{TAG_PREFIX}.global"

# `<index>.<name>`: the module part of the current layout. Writers always put the index (at least
# two digits) first, so stripping the first run of digits and its dot gives the name back even
# for names that start with digits themselves (`nn.Sequential` children "0", "10", ...).
_INDEXED = re.compile(r"^(\d{2,})\.(.+)$")


def scalar_tag(metric: str, module: str | None = None, index: int | None = None, width: int = 2) -> str:
    """The tag of ``metric`` for ``module`` (at position ``index`` of the model), or the global tag.

    Example:
        >>> scalar_tag("grad_norm", "encoder.fc1", index=3), scalar_tag("grad_norm")
        ('watch.grad_norm/03.encoder.fc1', 'watch.global/grad_norm')
    """
    if module is None:
        return f"{GLOBAL_SECTION}/{metric}"
    if index is None:
        return f"{TAG_PREFIX}.{metric}/{module}"
    return f"{TAG_PREFIX}.{metric}/{index:0{max(2, width)}d}.{module}"


def parse_tag(tag: str) -> tuple[str, str | None] | None:
    """``(metric, module)`` of one of our tags (module ``None`` for a global value), ``None`` otherwise.

    Reads the current layout and the older ``watch/<metric>/<module>`` one (no torch needed).

    Example:
        >>> parse_tag("watch.grad_norm/03.encoder.fc1"), parse_tag("watch.global/loss")
        (('grad_norm', 'encoder.fc1'), ('loss', None))
        >>> parse_tag("watch/grad_norm/net.0"), parse_tag("watch/global/loss"), parse_tag("train_loss")
        (('grad_norm', 'net.0'), ('loss', None), None)
    """
    head, sep, rest = tag.partition("/")
    if not sep or not rest:
        return None
    if head == TAG_PREFIX:  # older layout: watch/<metric>/<module>, watch/global/<metric>
        metric, sep, module = rest.partition("/")
        if not sep or not metric or not module:
            return None
        return (module, None) if metric == "global" else (metric, module)
    if not head.startswith(f"{TAG_PREFIX}.") or len(head) == len(TAG_PREFIX) + 1:
        return None
    metric = head[len(TAG_PREFIX) + 1 :]
    if metric == "global":
        return rest, None
    indexed = _INDEXED.match(rest)
    return metric, indexed.group(2) if indexed else rest


class ModuleOrder:
    """Stable ``module name -> index`` for tags, in the model's registration order.

    Names not in the model (a regularizer rule, a parameter of a module: ``encoder.0.weight``) take
    the index of their longest module prefix, or, failing that, the next free index when first seen,
    so a tag never changes during a run.

    Example:
        >>> order = ModuleOrder(["encoder", "encoder.fc1", "head"])
        >>> order.index("head"), order.index("encoder.fc1.weight"), order.index("rule_a")
        (2, 1, 3)
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._index: dict[str, int] = {}
        for name in names:
            self._index.setdefault(name, len(self._index))
        self.width = max(2, len(str(max(len(self._index) - 1, 0))))
        self._tags: dict[tuple[str, str | None], str] = {}  # a tag never changes during a run: made once

    def index(self, name: str) -> int:
        found = self._index.get(name)
        if found is not None:
            return found
        prefix = name
        while "." in prefix:
            prefix = prefix.rsplit(".", 1)[0]
            if prefix in self._index:
                return self._index[prefix]
        self._index[name] = len(self._index)
        return self._index[name]

    def tag(self, metric: str, module: str | None = None) -> str:
        tag = self._tags.get((metric, module))
        if tag is None:
            index = None if module is None else self.index(module)
            tag = self._tags[metric, module] = scalar_tag(metric, module, index, self.width)
        return tag


@dataclass
class Snapshot:
    """Statistics of one logging step, as host floats, identical on every rank.

    Attributes:
        step: Lightning's logging step (the x-axis of ``self.log`` curves).
        epoch: current epoch.
        per_module: ``metric -> {module name -> value}``, modules in registration order.
        global_: ``metric -> value`` for whole-model quantities.
        final: true for the read at the end of fit (a partial window).

    Example:
        >>> snap = Snapshot(step=49, epoch=0)
        >>> snap.put("dead_frac", 0.25, module="fc1")
        >>> snap.put("grad_norm", 1.5)
        >>> snap.scalars()
        {'watch.dead_frac/00.fc1': 0.25, 'watch.global/grad_norm': 1.5}
    """

    step: int
    epoch: int
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)
    global_: dict[str, float] = field(default_factory=dict)
    #: the read at the end of fit: the last window, possibly shorter than the logging interval
    final: bool = False

    def put(self, metric: str, value: float, module: str | None = None) -> None:
        if module is None:
            self.global_[metric] = float(value)
        else:
            self.per_module.setdefault(metric, {})[module] = float(value)

    def get(self, metric: str, module: str | None = None, default: float = math.nan) -> float:
        if module is None:
            return self.global_.get(metric, default)
        return self.per_module.get(metric, {}).get(module, default)

    def modules(self, metric: str) -> dict[str, float]:
        """``{module: value}`` for ``metric`` (empty if not measured this step)."""
        return self.per_module.get(metric, {})

    def scalars(self, order: ModuleOrder | None = None) -> dict[str, float]:
        """Every value under its tag; module indices from ``order`` (writers pass the model's).

        Without ``order`` the modules are numbered in the order this snapshot first meets them,
        which is only stable within one snapshot.
        """
        if order is None:
            order = ModuleOrder(name for row in self.per_module.values() for name in row)
        out = {
            order.tag(metric, module): value for metric, row in self.per_module.items() for module, value in row.items()
        }
        out.update({order.tag(metric): value for metric, value in self.global_.items()})
        return out
