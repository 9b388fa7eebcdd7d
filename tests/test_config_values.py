"""`HarmaConfig` values of the wrong type or out of range are named (as they come from JSON files
and command lines), never accepted to mean something else."""

from __future__ import annotations

import re

import pytest

import harma


@pytest.mark.parametrize(("field", "value", "message"), [
    ("gate_init", float("inf"), "HarmaConfig.gate_init must be a finite number, got inf"),
    ("block_gate_init", float("nan"), "HarmaConfig.block_gate_init must be a finite number, got nan"),
    ("mini_gate_init", float("-inf"), "HarmaConfig.mini_gate_init must be a finite number, got -inf"),
    # "false" is a true value in Python: as a layout it would read a sequence-first model batch-first.
    ("batch_first", "false", "HarmaConfig.batch_first must be true or false (bool), got 'false'"),
    ("freeze_backbone", 1, "HarmaConfig.freeze_backbone must be true or false (bool), got 1"),
    ("target_modules", 5, "HarmaConfig.target_modules must be None or a regular expression (str), got 5"),
])
def test_wrong_types_and_non_finite_gates_are_named(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        harma.HarmaConfig(**{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        harma.HarmaConfig.from_dict({field: value})
