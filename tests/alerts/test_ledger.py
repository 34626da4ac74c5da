"""AlertLedger: raise once, again when worse, clear after absence — pure Python, no Trainer."""

from __future__ import annotations

from lightning_watch import Alert
from lightning_watch.alerts import AlertLedger


def _alert(code="dead_units", value=0.8, severity="warning", module="fc"):
    return Alert(code, severity, 1, 0, module, value, 0.7, "m", "h")


def test_ledger_reraises_only_when_worse_or_back_after_clearing():
    def raised_again(first, second):
        ledger = AlertLedger()
        ledger.update([first], {first.code})
        return bool(ledger.update([second], {first.code}))

    assert not raised_again(_alert(value=0.8), _alert(value=0.9))
    assert raised_again(_alert(value=0.8), _alert(value=1.0, severity="error"))
    assert raised_again(_alert("exploding_gradients", 1.5e3), _alert("exploding_gradients", 2e4))
    assert raised_again(_alert("vanishing_gradients", 1e-4), _alert("vanishing_gradients", 1e-7))
    assert not raised_again(_alert("vanishing_gradients", 1e-4), _alert("vanishing_gradients", 1e-3))

    ledger = AlertLedger()
    raised = []
    raised += ledger.update([_alert()], {"dead_units"})
    raised += ledger.update([_alert(value=0.85)], {"dead_units"})  # same: no new alert
    raised += ledger.update([], {"dead_units"})
    raised += ledger.update([_alert()], {"dead_units"})  # absent once: not cleared yet
    assert len(raised) == 1
    raised += ledger.update([], {"dead_units"})
    raised += ledger.update([], {"dead_units"})  # absent twice: cleared
    assert ledger.active() == []
    raised += ledger.update([_alert()], {"dead_units"})
    assert len(raised) == 2 and ledger.active() == [("dead_units", "fc")]
