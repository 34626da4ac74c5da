"""The pure kernels and the one-read reduction, against naive element-by-element references."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_watch.stats import (
    MOMENT_FIELDS,
    StatBlock,
    accumulator_dtype,
    alive_units,
    grad_rows_alive,
    moments,
    nonfinite_count,
    read_blocks,
)


def _values(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_moments_match_a_plain_python_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(6, 7) * 3 + 1).to(dtype)
    m = moments(x)
    vals = _values(x)
    assert m.count == len(vals) == 42
    assert m.summed.shape == (len(MOMENT_FIELDS) - 1,)  # no saturation column without bounds
    assert m.summed[0].item() == pytest.approx(sum(vals), rel=1e-5, abs=1e-4)
    assert m.summed[1].item() == pytest.approx(sum(v * v for v in vals), rel=1e-5)
    assert m.summed[2].item() == 0
    assert m.high.item() == max(vals) and m.low.item() == min(vals)


def test_moments_count_nonfinite_and_do_not_hide_them():
    x = torch.tensor([1.0, math.nan, -math.inf, 2.0, math.inf])
    m = moments(x)
    assert m.summed[2].item() == 3
    assert math.isnan(m.summed[0].item())  # a NaN in the data makes the sum NaN: the truth


@pytest.mark.parametrize(("bounds", "margin"), [((0.0, 1.0), 0.01), ((-1.0, 1.0), 0.01), ((-1.0, 1.0), 0.2)])
def test_saturation_counts_values_within_the_margin_of_either_bound(bounds, margin):
    torch.manual_seed(1)
    lo, hi = bounds
    x = torch.rand(1000) * (hi - lo) + lo
    x[:5] = lo  # exactly at the asymptotes
    x[5:10] = hi
    edge = margin * (hi - lo)
    expected = sum(1 for v in _values(x) if v <= lo + edge or v >= hi - edge)
    m = moments(x, bounds, margin)
    assert m.summed.shape == (len(MOMENT_FIELDS),)
    assert m.summed[3].item() == expected
    assert expected >= 10


def test_nonfinite_count():
    x = torch.tensor([[0.0, math.nan], [math.inf, -math.inf], [1e38, -1e-45]])
    assert nonfinite_count(x).item() == 3
    assert nonfinite_count(torch.zeros(0)).item() == 0


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
def test_alive_units_against_a_loop(dim):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, 6) - 1.5  # mostly negative: some units never fire
    x[:, 2] = -1.0  # channel 2 never positive
    got = alive_units(x, dim).tolist()
    moved = x.movedim(dim, 0)
    expected = [bool((moved[u] > 0).any()) for u in range(moved.shape[0])]
    assert got == expected
    if dim == 1:
        assert got[2] is False


def test_alive_units_of_nan_and_zero_are_dead():
    x = torch.tensor([[math.nan, 0.0, 1e-30], [math.nan, -0.0, -1.0]])
    assert alive_units(x, 1).tolist() == [False, False, True]
    assert alive_units(torch.tensor([0.5, -0.5]), -1).tolist() == [True, False]  # unbatched


def test_grad_rows_alive():
    g = torch.zeros(4, 3, 2, 2)
    g[1, 0, 0, 0] = 1e-40  # a subnormal gradient is still a gradient
    g[3] = -2.0
    assert grad_rows_alive(g).tolist() == [False, True, False, True]
    # transposed convolutions keep units in dim 1
    gt = torch.zeros(2, 5, 3)
    gt[:, 4] = 1.0
    assert grad_rows_alive(gt, unit_dim=1).tolist() == [False, False, False, False, True]


def test_read_blocks_single_process():
    a, b = StatBlock(), StatBlock()
    a.add_sum("a.count", torch.tensor([1.0, 2.0]))
    a.add_max("a.peak", torch.tensor(3.0))
    b.add_min("b.low", torch.tensor([-1.0, 4.0]))
    assert not StatBlock() and a
    assert read_blocks([a, b]) == {"a.count": [1.0, 2.0], "a.peak": 3.0, "b.low": [-1.0, 4.0]}
    assert read_blocks([]) == {}


def test_read_blocks_reduces_each_entry_by_its_declared_operation_across_ranks():
    def block(rank: int) -> StatBlock:
        blk = StatBlock()
        blk.add_sum("sum", torch.tensor([1.0, 10.0]) * (rank + 1))
        blk.add_max("max", torch.tensor([5.0, -1.0]) if rank == 0 else torch.tensor([2.0, 7.0]))
        blk.add_min("min", torch.tensor(3.0) if rank == 0 else torch.tensor(-2.0))
        return blk

    # simulate a two-rank all_gather: each rank contributes its own packed vector
    packed = {}

    def capture(rank):
        def gather(t):
            packed[rank] = t
            return t.unsqueeze(0)

        read_blocks([block(rank)], gather=gather)

    capture(0), capture(1)
    both = torch.stack([packed[0], packed[1]])
    out = read_blocks([block(0)], gather=lambda t: both)
    assert out == {"sum": [3.0, 30.0], "max": [5.0, 7.0], "min": -2.0}
    calls = []
    two = read_blocks(
        [block(0), StatBlock(maxes={"other": torch.ones(3)})], gather=lambda t: calls.append(t) or torch.stack([t, t])
    )
    assert len(calls) == 1  # every block goes through one collective
    assert two["sum"] == [2.0, 20.0] and two["other"] == [1.0, 1.0, 1.0]


def test_read_blocks_rejects_duplicate_names():
    a, b = StatBlock(), StatBlock()
    a.add_sum("x", torch.zeros(1))
    b.add_max("x", torch.zeros(1))
    with pytest.raises(ValueError, match="unique"):
        read_blocks([a, b])


def test_accumulators_are_float64_where_the_device_has_it():
    assert accumulator_dtype(torch.device("cpu")) is torch.float64
    assert accumulator_dtype(torch.device("mps")) is torch.float32


@pytest.mark.parametrize("shape", [(8, 5), (300, 300)], ids=["mask path", "extremes path"])
def test_gradient_rows_alive_match_a_plain_any_nonzero_on_both_paths(shape):
    from lightning_watch.stats.kernels import grad_rows_alive

    g = torch.randn(*shape)
    g[1] = 0.0  # a dead unit
    g[2] = 0.0
    g[2, 3] = float("nan")  # broken, not silent: alive
    g[3] = 0.0
    g[3, -1] = -1e-30  # one tiny negative value: alive
    expected = [bool((row != 0).any()) for row in g]
    assert grad_rows_alive(g).tolist() == expected
    assert expected[:4] == [True, False, True, True]


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)], ids=["no rows", "rows of nothing", "empty"])
def test_gradient_rows_of_an_empty_shard_are_none_alive(shape):
    from lightning_watch.stats.kernels import grad_rows_alive

    assert grad_rows_alive(torch.zeros(*shape)).tolist() == [False] * shape[0]
