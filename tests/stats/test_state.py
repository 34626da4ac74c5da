"""StateRegistry: accumulators declared once give allocation, reset, the read's block and checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_watch.stats import StateRegistry, read_blocks

CPU = torch.device("cpu")


def registry() -> StateRegistry:
    state = StateRegistry()
    state.declare("sums", shape=(3,), reduce="sum")
    state.declare("peak", shape=(), reduce="max")
    state.declare("low", shape=(2,), reduce="min")
    state.declare("flags", shape=(2,), reduce="max", dtype=torch.bool)
    state.declare("seen", shape=(2,), reduce="sum", host=True)
    state.declare("scratch", shape=(1,), reduce="sum", persistent=False)
    return state


def test_allocate_fills_each_accumulator_with_the_identity_of_its_reduction():
    state = registry()
    assert not state.allocated and state["sums"] is None  # nothing exists before the device is known
    state.allocate(CPU)
    assert state.allocated and list(state) == ["sums", "peak", "low", "flags", "seen", "scratch"]
    assert state["sums"].tolist() == [0.0, 0.0, 0.0] and state["sums"].dtype == torch.float64
    assert state["peak"].shape == () and state["peak"].item() == -math.inf
    assert state["low"].tolist() == [math.inf, math.inf]
    assert state["flags"].dtype == torch.bool and state["flags"].tolist() == [False, False]
    assert state["seen"] == [0.0, 0.0]  # a host accumulator is a plain list


def test_shape_given_as_a_callable_is_asked_at_allocation_and_none_waits_for_the_first_value():
    sizes = {"n": 2}
    state = StateRegistry()
    state.declare("per_module", shape=lambda: (sizes["n"],))
    state.declare("lazy", shape=None, reduce="max")
    sizes["n"] = 5  # known only at fit start
    state.allocate(CPU)
    assert state["per_module"].shape == (5,) and state["lazy"] is None
    assert state.block("m").sums.keys() == {"m.per_module"}  # an unset accumulator is not read
    state["lazy"] = torch.tensor([1.0, 4.0], dtype=torch.float64)
    state.reset()
    assert state["lazy"].tolist() == [-math.inf, -math.inf]  # its size is kept by reset


def test_reset_refills_identities_in_place_and_keeps_sizes():
    state = registry()
    state.allocate(CPU)
    sums = state["sums"]
    state["sums"] += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    state["peak"] = torch.tensor(7.0, dtype=torch.float64)
    state["low"] = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    state["flags"][1] = True
    state["seen"][0] += 16
    state.reset()
    assert state["sums"] is sums and sums.tolist() == [0.0, 0.0, 0.0]
    assert state["peak"].item() == -math.inf and state["low"].tolist() == [math.inf, math.inf]
    assert state["flags"].tolist() == [False, False] and state["seen"] == [0.0, 0.0]


def test_block_reads_every_accumulator_with_its_declared_reduction():
    state = registry()
    state.allocate(CPU)
    state["sums"] += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    state["peak"] = torch.tensor(7.0, dtype=torch.float64)
    state["flags"][0] = True
    state["seen"][1] = 4
    block = state.block("m")
    assert set(block.sums) == {"m.sums", "m.seen", "m.scratch"}
    assert set(block.maxes) == {"m.peak", "m.flags"} and set(block.mins) == {"m.low"}
    assert block.sums["m.seen"] == [0.0, 4.0]  # a host list travels as it is: no device work to read it
    assert read_blocks([block])["m.seen"] == [0.0, 4.0]  # one process: it never goes through the device

    # two "ranks" holding the same state: sums add, max and min keep the extreme, by declaration
    values = read_blocks([block], gather=lambda t: torch.stack([t, t]))
    assert values["m.sums"] == [2.0, 4.0, 6.0] and values["m.seen"] == [0.0, 8.0]
    assert values["m.peak"] == 7.0 and values["m.low"] == [math.inf, math.inf]
    assert values["m.flags"] == [1.0, 0.0]
    assert set(state.block("m", names=iter(["peak"])).maxes) == {"m.peak"}


def test_state_dict_round_trip_is_plain_and_skips_non_persistent_accumulators():
    state = registry()
    state.allocate(CPU)
    state["sums"] += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    state["peak"] = torch.tensor(7.0, dtype=torch.float64)
    state["flags"][1] = True
    state["seen"][0] = 16
    state["scratch"] += 5.0
    saved = json.loads(json.dumps(state.state_dict()))  # host lists and floats only
    assert "scratch" not in saved
    assert saved["sums"] == [1.0, 2.0, 3.0] and saved["peak"] == 7.0 and saved["seen"] == [16, 0.0]

    restored = registry()
    restored.allocate(CPU)
    restored.load_state_dict(saved)
    assert restored["sums"].tolist() == [1.0, 2.0, 3.0] and restored["peak"].item() == 7.0
    assert restored["flags"].dtype == torch.bool and restored["flags"].tolist() == [False, True]
    assert restored["seen"] == [16, 0.0] and restored["scratch"].tolist() == [0.0]


def test_a_state_loaded_before_allocation_is_applied_at_allocation():
    state = registry()
    state.allocate(CPU)
    state["sums"] += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    saved = state.state_dict()

    restored = registry()
    restored.load_state_dict(saved)  # a checkpoint restored before the model's device is known
    assert restored["sums"] is None
    restored.allocate(CPU)
    assert restored["sums"].tolist() == [1.0, 2.0, 3.0]
    restored.reset()
    restored.allocate(CPU)  # applied once, not again at the next allocation
    assert restored["sums"].tolist() == [0.0, 0.0, 0.0]


def test_a_checkpoint_of_another_layout_is_ignored_not_half_applied():
    state = registry()
    state.allocate(CPU)
    state.load_state_dict({"sums": [1.0, 2.0], "seen": [1.0, 2.0, 3.0], "peak": 9.0, "unknown": [1.0], "low": None})
    assert state["sums"].tolist() == [0.0, 0.0, 0.0]  # shape (2,) against (3,): kept fresh
    assert state["seen"] == [0.0, 0.0]  # a host list of another length too
    assert state["peak"].item() == 9.0  # a matching entry of the same checkpoint is applied
    assert state["low"].tolist() == [math.inf, math.inf]


def test_bad_declarations_raise_naming_the_value():
    state = StateRegistry()
    with pytest.raises(ValueError, match=r"`reduce` must be one of sum, max, min, got 'mean'\."):
        state.declare("x", shape=(), reduce="mean")
    state.declare("x", shape=())
    with pytest.raises(ValueError, match="'x' is declared twice"):
        state.declare("x", shape=())
    with pytest.raises(KeyError, match="'y' is not declared"):
        state["y"] = torch.zeros(())


def test_clear_forgets_declarations_and_release_drops_values():
    state = registry()
    state.allocate(CPU)
    state.release()
    assert not state.allocated and state["sums"] is None and "sums" in list(state)
    state.clear()
    assert list(state) == []
