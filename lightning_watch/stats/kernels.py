"""Device kernels: each takes tensors and returns small tensors, never a Python number.

Nothing here calls ``.item()``, ``.cpu()`` or ``bool()`` on a tensor, so none of it waits for
the device; the one host transfer happens when a monitor reads its accumulators.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Columns of the row returned by :func:`moments`, in order.
MOMENT_FIELDS = ("sum", "sum_sq", "max_abs", "nonfinite", "saturated", "count")


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: sums of squares over many steps lose digits in float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def moments(x: Tensor, bounds: tuple[float, float] | None = None, margin: float = 0.01) -> Tensor:
    """One row of raw, summable statistics of ``x``, laid out as :data:`MOMENT_FIELDS`.

    The row has the accumulator dtype of the device (float64 but on MPS). Non-finite values are
    *not* removed (a NaN makes the sum NaN, which is the truth) and are counted in ``nonfinite``.
    With ``bounds=(lo, hi)`` (a sigmoid's ``(0, 1)``, a tanh's ``(-1, 1)``), ``saturated`` counts
    values within ``margin * (hi - lo)`` of either bound; otherwise it is 0.

    Example:
        >>> row = moments(torch.tensor([1.0, -2.0, float("nan")]))
        >>> row[4:].tolist()  # saturated, count
        [0.0, 3.0]
    """
    xf = x.detach()
    if xf.dtype != torch.float32 and xf.dtype != torch.float64:
        xf = xf.float()  # half/bfloat16 sums of many elements would round away
    acc = accumulator_dtype(xf.device)
    n = float(xf.numel())
    # Centred moments per call (two-pass accuracy), turned into raw sums in float64: a global
    # std from raw sums of squares in float32 would cancel catastrophically when |mean| >> std.
    var, mean = torch.var_mean(xf, correction=0)
    mean, var = mean.to(acc), var.to(acc)
    total = mean * n
    sum_sq = (var + mean * mean) * n
    max_abs = torch.linalg.vector_norm(xf, math.inf).to(acc)
    nonfinite = torch.isfinite(xf).logical_not_().sum().to(acc)
    if bounds is None:
        saturated = torch.zeros((), dtype=acc, device=xf.device)
    else:
        lo, hi = bounds
        edge = margin * (hi - lo)
        saturated = ((xf <= lo + edge) | (xf >= hi - edge)).sum().to(acc)
    count = torch.full((), n, dtype=acc, device=xf.device)
    return torch.stack([total, sum_sq, max_abs, nonfinite, saturated, count])


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
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), math.inf, dim=1) > 0


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
