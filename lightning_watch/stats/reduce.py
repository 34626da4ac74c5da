"""Reading accumulators back: one cross-process collective and one host transfer per read.

Every monitor hands its device accumulators over as a :class:`StatBlock` whose entries say how
they combine across processes (``sum``, ``max`` or ``min``). :func:`read_blocks` packs all blocks into a
single vector, gathers it across ranks once, reduces each entry by its declared operation, and
copies the result to the host once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_watch.stats.kernels import accumulator_dtype, constant


@dataclass
class StatBlock:
    """Named device tensors with declared cross-process reductions.

    Example:
        >>> block = StatBlock()
        >>> block.add_sum("count", torch.tensor([2.0, 3.0]))
        >>> block.add_max("peak", torch.tensor(7.0))
        >>> read_blocks([block])["count"]
        [2.0, 3.0]
    """

    #: device tensors, or Python lists of numbers already on the host (counts)
    sums: dict[str, Tensor | list] = field(default_factory=dict)
    maxes: dict[str, Tensor | list] = field(default_factory=dict)
    mins: dict[str, Tensor | list] = field(default_factory=dict)

    def add_sum(self, name: str, tensor: Tensor | list) -> None:
        self.sums[name] = tensor

    def add_max(self, name: str, tensor: Tensor | list) -> None:
        self.maxes[name] = tensor

    def add_min(self, name: str, tensor: Tensor | list) -> None:
        self.mins[name] = tensor

    def __bool__(self) -> bool:
        return bool(self.sums or self.maxes or self.mins)


Gather = Callable[[Tensor], Tensor]
"""``tensor (L,) -> tensor (world_size, L)``, e.g. ``trainer.strategy.all_gather``."""


def read_blocks(blocks: Sequence[StatBlock], gather: Gather | None = None) -> dict[str, float | list[float]]:
    """Reduce ``blocks`` across processes and return plain Python values.

    0-d tensors come back as floats, others as flat lists. Names must be unique over all blocks.
    This is the one place where statistics cross from device to host (a sync point, by design,
    on logging steps only).
    """
    entries: list[tuple[str, Tensor | list, int]] = []  # (name, value, sign); sign 0: sum, +1: max, -1: min
    for block in blocks:
        entries.extend((name, t, 0) for name, t in block.sums.items())
        entries.extend((name, t, 1) for name, t in block.maxes.items())
        entries.extend((name, t, -1) for name, t in block.mins.items())
    if not entries:
        return {}
    names = [name for name, _, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"statistic names must be unique across blocks, got {names!r}")
    out: dict[str, float | list[float]] = {}
    if gather is None:
        # one process: numbers already on the host (counts kept as Python lists) need no transfer
        for name, value, _ in entries:
            if isinstance(value, list):
                out[name] = [float(v) for v in value]
        entries = [entry for entry in entries if not isinstance(entry[1], list)]
        if not entries:
            return out
    device = next((t.device for _, t, _ in entries if isinstance(t, Tensor)), torch.device("cpu"))
    dtype = accumulator_dtype(device)
    flat = [_flat(t, dtype, device) for _, t, _ in entries]
    sizes = [f.numel() for f in flat]
    # one cat (it promotes bools and narrower floats to the accumulator dtype)
    packed = torch.cat(flat).to(dtype)
    if gather is not None:
        # a min is a max of negated values, so one gather and one amax serve both: a few kernels per
        # read, whatever the number of entries (the signs are per entry, expanded on the device)
        signs = _signs(tuple(sign for _, _, sign in entries), tuple(sizes), device)
        packed = torch.where(signs < 0, -packed, packed)
        gathered = gather(packed)
        if gathered.dim() == 2 and gathered.shape[0] > 1:
            gathered = gathered.to(device)
            packed = torch.where(signs != 0, gathered.amax(0), gathered.sum(0))
        elif gathered.dim() == 2:
            packed = gathered[0]
        packed = torch.where(signs < 0, -packed, packed)
    values = packed.tolist()  # the host transfer: a sync point, on logging steps only
    start = 0
    for (name, tensor, _), size in zip(entries, sizes):
        chunk = values[start : start + size]
        out[name] = chunk[0] if isinstance(tensor, Tensor) and tensor.dim() == 0 else chunk
        start += size
    return out


def _flat(value: Tensor | list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a 1-D tensor on ``device`` for the one ``cat``, with no view or copy it does not need.

    Accumulators are 1-D, never require grad and live on the read's device: each ``detach``,
    ``reshape`` or ``to`` is a dispatcher call of its own, dozens per read, so only the odd entry
    (a 0-d or 2-D tensor, a host list, another device) pays one.
    """
    if not isinstance(value, Tensor):
        return torch.tensor(value, dtype=dtype, device=device)
    if value.requires_grad:
        value = value.detach()
    if value.dim() != 1:
        value = value.reshape(-1)
    return value if value.device == device else value.to(device)


@functools.lru_cache(maxsize=8)
def _signs(signs: tuple[int, ...], sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Each entry's sign (0: sum, +1: max, -1: min) repeated over its elements, on ``device``.

    Made once per layout of a read (the same at every logging step of a fit): a tensor made from a
    Python list is a copy to the device that waits for its queue, a stall in each read on a GPU.
    """
    return torch.repeat_interleave(
        constant(signs, torch.long, device),
        constant(sizes, torch.long, device),
        output_size=sum(sizes),  # known here: the device need not be asked (no sync)
    )
