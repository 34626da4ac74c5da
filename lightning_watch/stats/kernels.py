"""Device kernels: each takes tensors and returns small tensors, never a Python number.

Nothing here calls ``.item()``, ``.cpu()`` or ``bool()`` on a tensor, so none of it waits for
the device; the one host transfer happens when a monitor reads its accumulators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: Columns of the summable row of :class:`Moments`, in order.
MOMENT_FIELDS = ("sum", "sum_sq", "nonfinite", "saturated")


def reduction_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float32 for reductions of half, bfloat16 and float32 inputs; float64 if one input is float64.

    Reductions may widen their input but never narrow it (``torch.linalg.vector_norm`` refuses
    ``dtype=torch.float32`` on a float64 tensor), and a float64 model (``precision="64-true"``)
    deserves float64 statistics.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def l2_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """One 0-d L2 norm per tensor, in one fused call, in :func:`reduction_dtype` precision.

    Example:
        >>> [n.item() for n in l2_norms([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.float64)])]
        [5.0, 2.0]
    """
    return list(torch._foreach_norm(list(tensors), 2, dtype=reduction_dtype(tensors)))


class Moments(NamedTuple):
    """Raw statistics of one tensor: ``summed`` adds across calls, ``high``/``low`` take extremes."""

    summed: Tensor  # (3,) or (4,) float32 (float64 input: float64): MOMENT_FIELDS, "saturated" only if bounded
    high: Tensor  # 0-d max
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
    return x.detach().mul(0).nan_to_num_(1.0).sum(dtype=torch.float32)


def moments(x: Tensor, bounds: tuple[float, float] | None = None, margin: float = 0.01) -> Moments:
    """Raw, summable statistics of ``x`` (see :data:`MOMENT_FIELDS`), plus its max and min.

    Each statistic is one reduction over ``x`` accumulated in float32 whatever the input dtype
    (bfloat16 sums of many elements would round away); callers add rows into float64
    accumulators so that many rows lose nothing. Non-finite values are *not* removed (a NaN makes
    ``sum`` NaN, which is the truth) and are counted in ``nonfinite``. With ``bounds=(lo, hi)`` (a
    sigmoid's ``(0, 1)``, a tanh's ``(-1, 1)``), ``saturated`` counts values within
    ``margin * (hi - lo)`` of either bound; without bounds the row stops before ``saturated``.

    The hook runs this on every watched output of a sampled batch, so it is built from as few
    kernels as possible (eight): on a GPU each costs a launch, on a CPU a pass over memory.
    Raw sums of squares make a standard deviation derived from them lose relative precision
    when ``|mean| / std`` is very large (about 1e-7 * (mean/std)**2 on the variance); centred
    per-call moments would avoid that but cost 20-40x more on a CPU, and monitoring does not need
    it.

    Example:
        >>> m = moments(torch.tensor([1.0, -2.0, float("nan")]))
        >>> m.summed[2].item(), m.count  # nonfinite, count
        (1.0, 3)
    """
    xf = x.detach()
    dtype = reduction_dtype([xf])
    total = xf.sum(dtype=dtype)
    # separate amax/amin: about 20 % faster than one aminmax on a CPU, and the same on a GPU
    high, low = xf.amax(), xf.amin()
    parts = [total, sum_of_squares(xf, dtype), nonfinite_count(xf).to(dtype)]
    if bounds is not None:
        lo, hi = bounds
        edge = margin * (hi - lo)
        parts.append(((xf <= lo + edge) | (xf >= hi - edge)).sum(dtype=dtype))
    return Moments(torch.stack(parts), high, low, xf.numel())


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
    dim = unit_dim % x.dim()
    others = tuple(d for d in range(x.dim()) if d != dim)
    if not others:
        return x.detach() > 0
    return torch.amax(x.detach(), dim=others) > 0


def grad_rows_alive(grad: Tensor, unit_dim: int = 0) -> Tensor:
    """Boolean vector over output units of a weight: True where the unit's gradient is not all zero.

    For ``nn.Linear`` and ``nn.ConvNd`` weights the units are rows (``unit_dim=0``). A unit whose
    outgoing activation is zero or whose gradient is blocked for every sample (a dead ReLU,
    whatever way it is written) gets an exactly zero row.
    """
    g = grad.detach()
    if unit_dim != 0:
        g = g.transpose(0, unit_dim)
    # abs+amax is exact (an L2 norm would underflow for rows of tiny values) and, unlike an
    # inf-norm or aminmax with a dim, fast on CPUs
    return g.reshape(g.shape[0], -1).abs().amax(dim=1) > 0


def group_norms(norms: list[Tensor], group_index: Tensor, num_groups: int) -> Tensor:
    """Combine per-tensor L2 norms into per-group L2 norms with one scatter-add.

    Args:
        norms: one 0-d norm per tensor (e.g. from ``torch._foreach_norm``).
        group_index: long tensor, same length as ``norms``, giving each tensor's group.
        num_groups: number of groups.

    Example:
        >>> n = [torch.tensor(3.0), torch.tensor(4.0), torch.tensor(1.0)]
        >>> group_norms(n, torch.tensor([0, 0, 1]), 2).tolist()
        [5.0, 1.0]
    """
    squares = torch.stack(norms).to(torch.float32).square()
    out = torch.zeros(num_groups, dtype=squares.dtype, device=squares.device)
    return out.index_add_(0, group_index, squares).sqrt_()
