"""Pure statistics: device kernels and their cross-process reduction. No Lightning imports."""

from lightning_watch.stats.kernels import (
    MOMENT_FIELDS,
    ROW_FIELDS,
    Moments,
    accumulator_dtype,
    alive_units,
    as_real,
    constant,
    grad_rows_alive,
    l2_norms,
    local_tensor,
    moment_row,
    moments,
    nonfinite_count,
    nonfinite_counts,
    replica_weight,
    spread_units,
)
from lightning_watch.stats.reduce import StatBlock, read_blocks
from lightning_watch.stats.state import StateRegistry

__all__ = [
    "MOMENT_FIELDS",
    "ROW_FIELDS",
    "Moments",
    "StatBlock",
    "StateRegistry",
    "accumulator_dtype",
    "alive_units",
    "as_real",
    "constant",
    "grad_rows_alive",
    "l2_norms",
    "local_tensor",
    "moment_row",
    "moments",
    "nonfinite_count",
    "nonfinite_counts",
    "read_blocks",
    "replica_weight",
    "spread_units",
]
