"""Activity-penalty rules without a Trainer: closed forms, output selection, rule validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_watch import ActivityRegularizer, ActivityRule
from lightning_watch.regularize.rules import OutputSums, rule_penalty


def test_rule_penalty_matches_closed_forms():
    g = torch.Generator().manual_seed(3)
    out = torch.randn(5, 3, 2, generator=g)
    b, s_abs, s_sq = 5, out.abs().sum().item(), out.pow(2).sum().item()

    def value(**kw):
        weight = kw.pop("weight", 1.0)
        rule = ActivityRule(include="x", **kw)
        return rule_penalty(rule, OutputSums(out, batch=b), weight).item()

    assert value(l1=0.3) == pytest.approx(0.3 * s_abs / b, rel=1e-6)
    assert value(l2=0.7) == pytest.approx(0.7 * s_sq / b, rel=1e-6)
    assert value(l1=0.3, l2=0.7) == pytest.approx((0.3 * s_abs + 0.7 * s_sq) / b, rel=1e-6)
    assert value(l2=0.7, reduction="sum") == pytest.approx(0.7 * s_sq, rel=1e-6)
    assert value(l2=0.7, weight=4.0) == pytest.approx(4 * 0.7 * s_sq / b, rel=1e-6)
    top = out.max().item()
    assert value(fn=lambda t: t.max()) == pytest.approx(top / b, rel=1e-6)
    assert value(fn=lambda t: t.max(), reduction="sum") == pytest.approx(top, rel=1e-6)
    # half-precision outputs are reduced in float32
    half = OutputSums(out.to(torch.bfloat16), batch=b)
    exact = out.to(torch.bfloat16).float().pow(2).sum().item()
    assert rule_penalty(ActivityRule(include="x", l2=1.0), half, 1.0).dtype == torch.float32
    assert rule_penalty(ActivityRule(include="x", l2=1.0), half, 1.0).item() == pytest.approx(exact / b, rel=1e-6)


def test_batch_size_follows_batch_first_packed_sequences_and_tuple_choice():
    from torch.nn.utils.rnn import pack_padded_sequence

    from lightning_watch.regularize.rules import select_output

    lstm = nn.LSTM(3, 4)  # (seq, batch, feature) by default
    seq, batch = 7, 5
    x = torch.randn(seq, batch, 3)
    output = lstm(x)
    rule = ActivityRule(include="lstm", l2=1.0)
    tensor, size = select_output(rule, "lstm", lstm, output)
    assert tensor is output[0] and size == batch
    hidden_rule = ActivityRule(include="lstm", l2=1.0, output=1)  # (h, c) -> h
    tensor, size = select_output(hidden_rule, "lstm", lstm, output)
    assert tensor is output[1][0] and size == batch
    packed = pack_padded_sequence(x, lengths=[7, 6, 4, 2, 1])
    out_packed = lstm(packed)
    tensor, size = select_output(rule, "lstm", lstm, out_packed)
    assert tensor is out_packed[0].data and size == batch  # padding-free sum, batch from batch_sizes
    first = nn.LSTM(3, 4, batch_first=True)
    _, size = select_output(rule, "lstm", first, first(torch.randn(batch, seq, 3)))
    assert size == batch


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            {"encoder.fc2": {"l2": -1e-3}},
            r"`l2` of rule 'encoder.fc2' must be a non-negative finite number, got -0.001",
        ),
        ({"encoder.fc2": {"l1": "big"}}, r"`l1` of rule 'encoder.fc2' must be a non-negative"),
        ({"encoder.fc2": {"l2": 1e-3, "weight": -2}}, r"`weight` of rule 'encoder.fc2' must be a non-negative"),
        ({"encoder.fc2": {"l3": 1e-3}}, r"rule 'encoder.fc2' has unknown key\(s\) \['l3'\]; valid keys are"),
        ({"encoder.fc2": {"weight": 1.0}}, r"rule 'encoder.fc2' must set a penalty"),
        ({"encoder.fc2": {"l2": 1e-3, "reduction": "mean"}}, r"`reduction` of rule 'encoder.fc2' must be one of"),
        ({"encoder.fc2": 0.1}, r"rule 'encoder.fc2' must be a mapping such as"),
        ({}, r"`rules` must hold at least one rule"),
        ("encoder.fc2", r"`rules` must be a mapping"),
        ([ActivityRule(include="a", l1=1.0), ActivityRule(include="a", l2=1.0)], r"rule names must be unique"),
    ],
)
def test_bad_rules_fail_at_construction(rules, message):
    with pytest.raises(ValueError, match=message):
        ActivityRegularizer(rules)
