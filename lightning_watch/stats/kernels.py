"""Device kernels: each takes tensors and returns small tensors, never a Python number.

Nothing here calls ``.item()``, ``.cpu()`` or ``bool()`` on an accelerator's tensor, so none of it
waits for the device (:func:`cpu_values` reads CPU tensors only, where there is no device to wait
for); the one host transfer happens when a monitor reads its accumulators.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: Columns of the summable row of :class:`Moments`, in order.
MOMENT_FIELDS = ("sum", "sum_sq", "nonfinite", "saturated")
#: Columns of :func:`moment_row`: the summable :data:`MOMENT_FIELDS`, then the largest and the smallest element.
ROW_FIELDS = (*MOMENT_FIELDS, "max", "min")


_DTENSOR: list[type | None] = []  # filled on first use: the DTensor class, or None
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})  # never sharded


def _dtensor_type() -> type | None:
    # looked up once per process (an import statement per call costs microseconds, on every kernel)
    if not _DTENSOR:
        dtensor = None
        # torch builds without distributed support have no DTensor; nothing can be sharded there
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor as dtensor
            except ImportError:  # pragma: no cover - torch < 2.4
                dtensor = None
        _DTENSOR.append(dtensor)
    return _DTENSOR[0]


@functools.lru_cache(maxsize=64)
def constant(values: float | tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device`` (0-d for a number), made once per ``(values, dtype, device)``.

    A tensor made from Python numbers is a copy to the device, and a plain copy waits for the
    device's queue: made once (from pinned memory, asynchronously, on CUDA) it costs nothing on the
    steps that reuse it. Callers share the tensor: they must never write into it.

    Example:
        >>> cpu = torch.device("cpu")
        >>> constant((3, 1), torch.long, cpu).tolist(), constant(0.0, torch.float32, cpu).dim()
        ([3, 1], 0)
        >>> constant((3, 1), torch.long, cpu) is constant((3, 1), torch.long, cpu)  # made once
        True
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        try:
            host = host.pin_memory()
        except RuntimeError:  # no pinned memory to be had: a plain copy, made once all the same
            return host.to(device)
    return host.to(device, non_blocking=True)


def local_tensor(x: Tensor) -> Tensor:
    """The part of ``x`` this process holds: a ``DTensor``'s local shard, any other tensor itself.

    Kernels work on local shards only (never a gather); the cross-process sum of the statistics
    is done once per logging step by :func:`~lightning_watch.stats.read_blocks`.

    Example:
        >>> local_tensor(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if type(x) in _PLAIN:  # the common case, without the DTensor lookup
        return x
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(x, dtensor):
        return x.to_local()
    return x


def replica_weight(x: Tensor) -> float:
    """Share of ``x``'s local statistics that a cross-process *sum* should count: ``1 / replicas``.

    A ``DTensor`` is split along its ``Shard`` mesh dimensions (local squares add up) and copied
    along its ``Replicate`` ones (each copy must count once, not once per rank: torchtitan issue
    2318 is an 8x wrong norm from that mistake). A plain tensor counts fully.

    Example:
        >>> replica_weight(torch.ones(2))
        1.0
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(x, dtensor):
        return 1.0
    from torch.distributed.tensor import Replicate

    copies = 1
    for size, placement in zip(x.device_mesh.mesh.shape, x.placements):
        if isinstance(placement, Replicate):
            copies *= int(size)
    return 1.0 / copies


def as_real(x: Tensor) -> Tensor:
    """A real view or copy of ``x`` with the same L2 norm and the same non-finite entries.

    Complex ``z`` becomes its ``(re, im)`` view (``sum re**2 + im**2 = sum |z|**2``, no copy);
    integer and bool tensors become float32 copies (rare: integer buffers, integer outputs).
    """
    if torch.is_complex(x):
        return torch.view_as_real(x.resolve_conj() if x.is_conj() else x)
    if not x.is_floating_point():
        return x.to(torch.float32)
    return x


def reduction_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float32 for reductions of half, bfloat16 and float32 inputs; float64 if one input is float64.

    Reductions may widen their input but never narrow it (``torch.linalg.vector_norm`` refuses
    ``dtype=torch.float32`` on a float64 tensor), and a float64 model (``precision="64-true"``)
    deserves float64 statistics. Complex128 counts as float64.
    """
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t.dtype in wide for t in tensors) else torch.float32


def l2_norms(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> list[Tensor]:
    """One 0-d L2 norm per tensor, in one fused call, in :func:`reduction_dtype` precision.

    Any dtype is accepted: complex tensors give the norm of ``|z|``, integer ones are widened.
    ``DTensor`` inputs are measured on their local shard and scaled by ``sqrt(weight)`` (default:
    :func:`replica_weight`), so that the *sum over processes* of the squares is the squared norm
    of the whole tensor. ``weights`` gives the weights explicitly, for local copies of sharded
    tensors (the parameter-delta copy).

    Example:
        >>> [n.item() for n in l2_norms([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.float64)])]
        [5.0, 2.0]
        >>> l2_norms([torch.tensor([3 + 4j])])[0].item()
        5.0
    """
    if not tensors:
        return []
    if weights is None:
        weights = [replica_weight(t) for t in tensors]
    local = [as_real(local_tensor(t)) for t in tensors]
    norms = list(torch._foreach_norm(local, 2, dtype=reduction_dtype(local)))
    if any(w != 1.0 for w in weights):
        norms = [n * (w**0.5) if w != 1.0 else n for n, w in zip(norms, weights)]
    return norms


class Moments(NamedTuple):
    """Raw statistics of one tensor: ``summed`` adds across calls, ``high``/``low`` take extremes."""

    summed: Tensor  # (3,) or (4,) float32 (float64 input: float64): MOMENT_FIELDS, "saturated" only if bounded
    high: Tensor  # 0-d max (in the row's dtype)
    low: Tensor  # 0-d min
    count: int  # number of elements (a host number: it costs no device work)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: sums of squares over many steps lose digits in float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def nonfinite_count(x: Tensor) -> Tensor:
    """Number of NaN/Inf elements of ``x`` as a float32 0-d tensor.

    ``x * 0`` is 0 where ``x`` is finite and NaN where it is not, so replacing NaN by 1 and summing
    counts them. On a CPU this is about 5x faster than ``(~torch.isfinite(x)).sum()``.

    Example:
        >>> nonfinite_count(torch.tensor([1.0, float("inf"), float("nan"), -float("inf")])).item()
        3.0
    """
    x = as_real(local_tensor(x.detach()))
    return x.mul(0).nan_to_num_(1.0).sum(dtype=torch.float32)


def cpu_values(*tensors: Tensor) -> list[float]:
    """The values of CPU tensors, read on the host: there is no device to wait for, so this is no sync.

    The CPU-only shortcuts (a finite sum needs no count of NaN/Inf) read through here, so the tests
    that trace host reads off logging steps can tell them from a read that would sync an accelerator.

    Raises:
        ValueError: for a tensor on another device (reading it would wait for that device).

    Example:
        >>> cpu_values(torch.tensor(1.5), torch.tensor([2.0, 3.0]))
        [1.5, 2.0, 3.0]
    """
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("cpu_values reads CPU tensors only: on an accelerator a read is a sync")
    if len(tensors) == 1 and tensors[0].dim() == 1:  # a row as it is: no view, no copy
        return tensors[0].tolist()
    if all(t.dim() == 0 for t in tensors):  # sums and norms: one stack, no view per tensor
        return torch.stack(tensors).tolist()  # stack promotes mixed dtypes
    flat = [t.detach().reshape(-1) for t in tensors]
    return flat[0].tolist() if len(flat) == 1 else torch.cat(flat).tolist()  # cat promotes mixed dtypes


def nonfinite_counts(tensors: Sequence[Tensor], norms: Sequence[Tensor]) -> Tensor:
    """NaN/Inf elements of each tensor (float32, 1-D), given their L2 norms from :func:`l2_norms`.

    A tensor whose norm is finite has none (a NaN or an infinity makes the sum of squares NaN or
    infinite; an overflow of large finite values only sends it to a count that then finds 0). On the
    CPU, where reading the norms costs no sync, only tensors with a non-finite norm are counted: a
    counting pass is three times the cost of the norm. On an accelerator every tensor is counted,
    since choosing would need a host read.

    Example:
        >>> xs = [torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 1.0, float("inf")])]
        >>> nonfinite_counts(xs, l2_norms(xs)).tolist()
        [0.0, 2.0]
    """
    if not tensors:
        return torch.zeros(0)
    device = norms[0].device
    if device.type != "cpu":
        return torch.stack([nonfinite_count(t) for t in tensors]).to(device)
    counts = torch.zeros(len(tensors), dtype=torch.float32)
    for i, (t, norm) in enumerate(zip(tensors, cpu_values(*norms))):
        if not math.isfinite(norm):
            counts[i] = nonfinite_count(t)
    return counts


def moment_row(x: Tensor, bounds: tuple[float, float] | None = None, margin: float = 0.01) -> tuple[Tensor, int]:
    """Raw statistics of ``x`` as one vector (see :data:`ROW_FIELDS`), and its number of elements.

    ``sum``, ``sum_sq``, ``nonfinite`` and ``saturated`` add up across calls; ``max`` and ``min``
    take extremes. Each statistic is one reduction over ``x`` accumulated in float32 whatever the
    input dtype (bfloat16 sums of many elements would round away); callers add rows into float64
    accumulators so that many rows lose nothing. Non-finite values are *not* removed (a NaN makes
    ``sum`` NaN, which is the truth) and are counted in ``nonfinite``. With ``bounds=(lo, hi)`` (a
    sigmoid's ``(0, 1)``, a tanh's ``(-1, 1)``), ``saturated`` counts values within
    ``margin * (hi - lo)`` of either bound; without bounds it is 0. The count is a host number: it
    costs no device work.

    The hook runs this on every watched output of a sampled batch, so it is built from as few
    kernels as possible: on a GPU each costs a launch, on a CPU a pass over memory. One ``stack``
    holds every field, so that a caller adds the rows of all the outputs of a batch to its
    accumulators at once (a few operations per batch, not per output); the fields known to be 0
    are a shared :func:`constant`.
    Raw sums of squares make a standard deviation derived from them lose relative precision
    when ``|mean| / std`` is very large (about 1e-7 * (mean/std)**2 on the variance); centred
    per-call moments would avoid that but cost 20-40x more on a CPU, and monitoring does not need
    it.

    Example:
        >>> row, count = moment_row(torch.tensor([1.0, -2.0, float("nan")]))
        >>> dict(zip(ROW_FIELDS, row.tolist()))["nonfinite"], count
        (1.0, 3)
    """
    xf = local_tensor(x.detach())
    if torch.is_complex(xf):  # statistics of |z|: a complex output's scale is its magnitude
        xf = xf.abs()
    elif not xf.is_floating_point():
        xf = xf.to(torch.float32)
    dtype = reduction_dtype([xf])
    total = xf.sum(dtype=dtype)
    # one aminmax: one pass and one launch (measured faster than amax + amin with torch 2.13 on a CPU)
    low, high = torch.aminmax(xf)
    squares = sum_of_squares(xf, dtype)
    zero = constant(0.0, torch.float32, xf.device)  # `stack` promotes it to the row's dtype
    saturated = zero
    if bounds is not None:
        lo, hi = bounds
        edge = margin * (hi - lo)
        saturated = ((xf <= lo + edge) | (xf >= hi - edge)).sum(dtype=dtype)
    if xf.device.type == "cpu":
        # reading the row costs no sync on the CPU: finite sums mean no NaN/Inf, and the row is done
        # (a counting pass saved); `stack` promotes a bfloat16 output's extremes to the float32 sums exactly
        row = torch.stack([total, squares, zero, saturated, high, low])
        total_value, squares_value = cpu_values(row)[:2]
        if math.isfinite(total_value) and math.isfinite(squares_value):
            return row, xf.numel()
    nonfinite = nonfinite_count(xf).to(dtype)
    return torch.stack([total, squares, nonfinite, saturated, high, low]), xf.numel()


def moments(x: Tensor, bounds: tuple[float, float] | None = None, margin: float = 0.01) -> Moments:
    """:func:`moment_row` as :class:`Moments`: the summable row (without ``saturated`` when there are no
    bounds), the max and the min.

    Example:
        >>> m = moments(torch.tensor([1.0, -2.0, float("nan")]))
        >>> m.summed[2].item(), m.count  # nonfinite, count
        (1.0, 3)
    """
    row, count = moment_row(x, bounds, margin)
    width = len(MOMENT_FIELDS) if bounds is not None else len(MOMENT_FIELDS) - 1
    return Moments(row[:width], row[len(MOMENT_FIELDS)], row[len(MOMENT_FIELDS) + 1], count)


def sum_of_squares(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x * x).sum()`` as a 0-d ``dtype`` tensor, without a temporary the size of ``x``.

    A dot product of the flat tensor with itself is one fused pass (about 1.7x faster than
    ``vector_norm(x) ** 2`` on a CPU); it needs a contiguous tensor already in ``dtype``, since
    a half-precision dot would also *accumulate* in half precision.

    Example:
        >>> sum_of_squares(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.float32).item()
        30.0
    """
    if x.dtype == dtype and x.is_contiguous():
        flat = x.reshape(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(x, 2, dtype=dtype).square()


def alive_units(x: Tensor, unit_dim: int) -> Tensor:
    """Boolean vector over units of ``x``: True where some element along the other dims is > 0.

    A NaN unit counts as not alive.

    Example:
        >>> x = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 2.0]])
        >>> alive_units(x, unit_dim=1).tolist()
        [True, False, True]
    """
    x = local_tensor(x)
    if torch.is_complex(x):
        x = x.abs()
    dim = unit_dim % x.dim()
    others = tuple(d for d in range(x.dim()) if d != dim)
    if not others:
        return x.detach() > 0
    return torch.amax(x.detach(), dim=others) > 0


#: from this many elements on, :func:`grad_rows_alive` reads row extremes rather than a `!= 0` mask
_ROWS_BY_EXTREMES = 65536


def grad_rows_alive(grad: Tensor, unit_dim: int = 0) -> Tensor:
    """Boolean vector over output units of a weight: True where the unit's gradient is not all zero.

    For ``nn.Linear`` and ``nn.ConvNd`` weights the units are rows (``unit_dim=0``). A unit whose
    outgoing activation is zero or whose gradient is blocked for every sample (a dead ReLU,
    whatever way it is written) gets an exactly zero row.

    A ``DTensor`` gradient gives a vector over *all* units of the whole weight: the rows of the
    local shard are placed at their global offset, other rows are False, so a cross-process
    ``max`` (logical or) of the vectors of all ranks is the answer for the whole weight.
    """
    # a `.grad` needs no detach (unless made with create_graph), a 2-D one no reshape: each is a
    # dispatcher call, once per weighted layer on every sampled step
    g = local_tensor(grad.detach() if grad.requires_grad else grad)
    if torch.is_complex(g):
        g = g.abs()
    if unit_dim != 0:
        g = g.transpose(0, unit_dim)
    if not g.numel():  # an empty shard (a rank holding none of the rows, or rows of no elements): no reshape
        alive = g.new_zeros(g.shape[0], dtype=torch.bool)
    elif g.numel() < _ROWS_BY_EXTREMES:
        # "any element != 0": exact (an L2 norm would underflow for rows of tiny values), two small kernels;
        # a NaN row counts as alive (NaN != 0): its gradient is broken, not silent
        alive = (_rows(g) != 0).any(dim=1)
    else:
        # the same answer from a row's largest and smallest elements (all zero iff both are 0; a NaN row's
        # max is NaN): two reductions and no temporary, 4-10x faster on a CPU from 64K elements on
        # (measured: 0.19 against 2.0 ms for a 1024 x 1024 gradient, equal at 64 x 64)
        rows = _rows(g)
        alive = (rows.amax(dim=1) != 0) | (rows.amin(dim=1) != 0)
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(grad, dtensor):
        return alive
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
    out = torch.zeros(grad.shape[unit_dim], dtype=torch.bool, device=alive.device)
    start = int(offsets[unit_dim])
    out[start : start + alive.shape[0]] = alive
    return out


def _rows(g: Tensor) -> Tensor:
    """``g`` as (units, everything else): a 2-D tensor as it is (a reshape is a dispatcher call too)."""
    return g if g.dim() == 2 else g.reshape(g.shape[0], -1)


def spread_units(alive: Tensor, weight: Tensor | None) -> Tensor:
    """Place a shard's unit vector at its global offset when the layer that produced it is column-sharded.

    Under tensor parallelism (``ColwiseParallel``) a layer's output holds this rank's share of the
    features only, as its weight holds those rows (``Shard(0)`` on a 1-D mesh). Spread over all
    ``weight.shape[0]`` units, the vectors of all ranks line up for the cross-process ``max``.
    Any other case (a plain weight, an output that already holds every unit) is returned as is.

    Example:
        >>> spread_units(torch.tensor([True, False]), torch.ones(2, 3)).tolist()
        [True, False]
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(weight, dtensor) or weight.dim() < 1 or alive.dim() != 1:
        return alive
    total = weight.shape[0]
    if alive.shape[0] == total or weight.device_mesh.ndim != 1:
        return alive
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placement = weight.placements[0]
    if not (isinstance(placement, Shard) and placement.dim == 0):
        return alive
    local, offsets = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    if local[0] != alive.shape[0]:
        return alive
    out = torch.zeros(total, dtype=torch.bool, device=alive.device)
    out[int(offsets[0]) : int(offsets[0]) + alive.shape[0]] = alive
    return out
