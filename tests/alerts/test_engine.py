"""AlertEngine without a Trainer: snapshots in, findings out; the ledger, history and checkpoint state."""

from __future__ import annotations

import json

import pytest

from lightning_watch import WatchWarning
from lightning_watch.alerts import AlertConfig, AlertEngine
from lightning_watch.snapshot import Snapshot


def dead(step: int, fraction: float, module: str = "fc1") -> Snapshot:
    snapshot = Snapshot(step=step, epoch=0)
    snapshot.put("dead_frac", fraction, module=module)
    return snapshot


def engine_for(**kwargs) -> AlertEngine:
    return AlertEngine(AlertConfig.from_args(settings={"dead_units": {"patience": 1}}, **kwargs))


def test_a_builtin_finding_is_raised_once_with_its_action_and_shared_by_every_rank():
    engine = engine_for(actions={"dead_units": "stop"})
    first = engine.evaluate(dead(9, 0.9))
    assert [(f.alert.code, f.alert.module, f.action, f.shared) for f in first] == [("dead_units", "fc1", "stop", True)]
    assert first[0].alert.step == 9 and first[0].alert.value == pytest.approx(0.9)
    assert engine.evaluate(dead(19, 0.9)) == []  # the ledger raised it already
    assert engine.alerts == [first[0].alert]
    assert engine.ledger.active() == [("dead_units", "fc1")]
    assert [s.step for s in engine.history] == [9, 19]


def test_disabled_codes_are_neither_evaluated_nor_recorded():
    engine = AlertEngine(AlertConfig.from_args(settings={"dead_units": False}))
    assert engine.evaluate(dead(9, 0.9)) == []
    alert = engine_for().context().alert("dead_units", dead(9, 0.9), "fc1", 0.9, 0.7, "m", "h")
    assert engine.record([alert]) == [] and engine.alerts == []  # findings from outside the rules too


def test_user_rule_findings_are_rank_local_and_a_failing_rule_is_skipped_with_one_warning():
    def always(snapshot, context):
        yield context.alert("mine", snapshot, None, 1.0, 0.0, "Mine.", "None.")

    always.codes = ("mine",)

    def broken(snapshot, context):
        raise RuntimeError("boom")

    engine = AlertEngine(AlertConfig.from_args(rules=[always, broken], actions={"mine": "raise"}))
    with pytest.warns(WatchWarning, match="boom"):
        findings = engine.evaluate(Snapshot(step=0, epoch=0))
    # a user's rule may read rank-local state: its finding must be agreed before acting
    assert [(f.alert.code, f.action, f.shared) for f in findings] == [("mine", "raise", False)]
    assert [s.step for s in engine.history] == [0]  # the snapshot is remembered despite the broken rule


def test_state_dict_is_plain_and_a_restored_engine_does_not_raise_again():
    engine = engine_for()
    engine.evaluate(dead(9, 0.9))
    engine.forward_order = ["fc1", "fc2"]
    state = json.loads(json.dumps(engine.state_dict()))  # JSON-able: plain lists, dicts, numbers
    restored = engine_for()
    restored.load_state_dict(state)
    assert [a.to_dict() for a in restored.alerts] == [a.to_dict() for a in engine.alerts]
    assert [s.step for s in restored.history] == [9] and restored.history[0].get("dead_frac", "fc1") == 0.9
    assert restored.forward_order == ["fc1", "fc2"]
    assert restored.evaluate(dead(19, 0.9)) == []  # the ledger came back with the alerts
    restored.reset()
    assert restored.alerts == [] and list(restored.history) == [] and restored.ledger.active() == []
