"""Healthy example programs stay quiet under the default ``Watch()`` (issue 13, precision).

Three of the programs of ``benchmarks/diagnosis/healthy.py`` (the full set is
``python benchmarks/diagnosis.py --healthy``), each trained for real in a fresh forked process with
the Trainer's defaults: each must reach its stated metric, and ``Watch()`` must raise no warning and
no error on it. Chosen for what tripped the rules before: a forward that samples noise in eval mode
(``vae``, batch mixing), a time-major language model reading its text in order with next-token
targets (``transformer_lm``: batch mixing, unshuffled data, label imbalance), and a full-batch
graph network whose nodes do mix by design (``gcn``). About 20 s on one core.
"""

from __future__ import annotations

import pytest

from benchmarks.diagnosis import healthy

PROGRAMS = ("vae", "transformer_lm", "gcn")


@pytest.fixture(scope="module")
def rows():
    return {row["program"]: row for row in healthy.run_all(list(PROGRAMS), seed=0, timeout=120, progress=False)}


@pytest.mark.parametrize(
    "name",
    [
        "vae",
        "transformer_lm",
        "gcn",
    ],
)
def test_healthy_program_trains_and_raises_no_warning(rows, name):
    row = rows[name]
    assert row["error"] is None, row.get("traceback")
    # the program is healthy: it reaches its metric (an independent evaluation, not lightning_watch's)
    assert row["trains"], (row["metric"], row["before"], row["after"], row["target"])
    better = row["after"] > row["before"] if row["higher_is_better"] else row["after"] < row["before"]
    assert better
    assert healthy.noisy(row) == [], [(a["code"], a["severity"], a["message"]) for a in row["alerts"]]
    # Watch did look: it took statistics snapshots (at least the end-of-fit one) for its rules
    assert row["last_snapshot_step"] is not None and row["last_snapshot_step"] >= 0


def test_registry_has_the_programs_the_issue_names():
    names = set(healthy.PROGRAMS)
    assert {"mnist", "vae", "dcgan", "lstm_lm", "transformer_lm", "gcn", "reinforce", "lbfgs_sine"} <= names
    assert len(healthy.registry(real=True)) >= 10
