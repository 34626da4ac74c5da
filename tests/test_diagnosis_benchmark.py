"""Regression guard of the fault benchmark (benchmarks/diagnosis.py): the benchmark itself works.

The fast subset (one setup, three operators) trains for real in forked processes; the assertions are
about the benchmark (ground truth, scoring, identical watched/unwatched runs) and about faults today's
``Watch()`` already names, not about targets it does not meet yet.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.diagnosis import cli, operators, score, setups

DEEPCRIME = ("TCL", "TRD", "TUD", "TAN", "HBS", "HLR", "HNE", "HDB", "ACH", "ARM", "AAL", "RAW", "RCW", "RRW",
             "WCI", "WAB", "WRB", "LCH", "OCH", "OCG", "VRM")  # fmt: skip
PYTORCH = ("no_zero_grad", "none_return", "detach", "frozen", "head_only_optimizer", "mse_broadcast",
           "view_not_permute", "softmax_batch", "unnormalized", "relu_logits", "softmax_logits")  # fmt: skip


def test_operator_catalogue():
    names = [op.name for op in operators.OPERATORS]
    assert len(names) >= 30 and len(set(names)) == len(names)
    for code in DEEPCRIME:
        assert any(name.split("_")[0] == code for name in names), code
    for name in PYTORCH:
        assert name in names
    for op in operators.OPERATORS:
        assert op.family in operators.FAMILIES
        assert set(op.setups) <= set(setups.SETUPS)
        op.apply(setups.config(op.setups[0]))  # every edit names existing config keys


def _runs(*accs, nan=False):
    return [{"val_acc": a, "nan": nan} for a in accs]


def test_classify_margin_and_nan():
    original = _runs(0.90, 0.91, 0.92)  # sigma 0.01: the margin is max(0.05, 0.03) = 0.05
    assert not score.classify(original, _runs(0.87, 0.86, 0.88))["killed"]  # 0.04 below
    assert score.classify(original, _runs(0.84, 0.85, 0.85))["killed"]  # 0.0633 below
    assert score.classify(original, _runs(0.91, 0.91, 0.91, nan=True))["killed"]
    noisy = _runs(0.70, 0.80, 0.90)  # sigma 0.1: the margin is 3 sigma = 0.3
    verdict = score.classify(noisy, _runs(0.55, 0.55, 0.55))
    assert not verdict["killed"] and math.isclose(verdict["margin"], 0.3)


def test_setup_rejects_unknown_name():
    with pytest.raises(ValueError, match="mlp"):
        setups.config("resnet")
    with pytest.raises(ValueError, match="HLR_x100"):
        operators.select("HLR_x1000")


def test_quick_benchmark(tmp_path):
    result = cli.main(["--quick", "--no-cache", "--jobs", "2", "--out", str(tmp_path), "--quiet"])
    rows = {r["operator"]: r for r in result["rows"]}
    # ground truth, without lightning_watch: the original is alive, learning rate x100 ruins the MLP
    assert not rows["original"]["killed"]
    assert rows["original"]["acc_original"] > 0.85
    assert rows["HLR_x100"]["killed"] and rows["HLR_x100"]["acc"] < 0.5
    # the default Watch() names the cause of two clear-cut faults today
    assert rows["HLR_x100"]["runs"][0]["cause"], rows["HLR_x100"]["runs"][0]["codes"]
    assert "batch_mixing:error" in rows["softmax_batch"]["runs"][0]["codes"]
    # ... stays quiet on the original, never crashes, and does not change the training
    summary = result["summary"]
    assert summary["false_alarms_originals"] == []
    assert summary["watch_crashes"] == []
    assert summary["runs_identical"] == summary["runs_compared"] == 4
    assert (tmp_path / "diagnosis_quick.md").read_text().count("| mlp |") == 4
    assert (tmp_path / "diagnosis_quick.json").exists()


def _run(acc: float, loss: float, params: float) -> dict:
    return {"val_acc": acc, "nan": False, "final_loss": loss, "param_sum": params, "alerts": [], "error": None}


def test_watched_runs_are_compared_with_unwatched_twins_trained_on_the_same_machine():
    from benchmarks.diagnosis.runner import Spec

    ops = [operators.BY_NAME["HLR_x100"]]
    keys = [f"mlp/{name}/{seed}" for name in ("original", "HLR_x100") for seed in (0, 1)]
    # the cache was trained on another CPU: the same runs end a few ulps apart there
    cache = {key: _run(0.9 if "original" in key else 0.2, 0.5000001, 10.000001) for key in keys}
    here = {f"mlp/{name}/0": _run(0.9, 0.5, 10.0) for name in ("original", "HLR_x100")}
    watched = {Spec("mlp", name, 0, True): _run(0.9, 0.5, 10.0) for name in ("original", "HLR_x100")}

    against_twins = score.score(["mlp"], ops, [0, 1], [0], cache, watched, here)["summary"]
    assert against_twins["runs_identical"] == against_twins["runs_compared"] == 2
    assert (against_twins["cache_reproduced"], against_twins["cache_checked"]) == (0, 2)
    # without twins the cache is all there is to compare with, and another machine's runs differ
    against_cache = score.score(["mlp"], ops, [0, 1], [0], cache, watched)["summary"]
    assert against_cache["runs_identical"] == 0 and against_cache["cache_checked"] == 0
    # a watched run that really differs is caught against its twin too
    watched[Spec("mlp", "HLR_x100", 0, True)] = _run(0.2, 0.5, 10.5)
    changed = score.score(["mlp"], ops, [0, 1], [0], cache, watched, here)["summary"]
    assert changed["not_identical"] == ["mlp/HLR_x100/0"]
