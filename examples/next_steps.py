"""What every example prints at its end: where to look next."""

from __future__ import annotations


def print_next_steps(logdir: str, charts: str = "watch.dead_frac, watch.grad_norm, watch.update_ratio") -> str:
    """Print (and return) the TensorBoard and ``lightning-watch report`` commands for ``logdir``."""
    text = (
        "\nWhere to look next:\n"
        f"  tensorboard --logdir {logdir}        # then open http://localhost:6006: "
        f"Scalars tab, sections {charts}; Custom Scalars; Images; Text (alerts)\n"
        f"  lightning-watch report {logdir}      # the health report and alerts, in the terminal\n"
    )
    print(text, flush=True)
    return text
