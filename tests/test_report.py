"""The report's per-digit results (fosctrain.report): a mask survives its bit string exactly,
so a later table can restrict any attack to any digit subset."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fosctrain.report import bits_mask, mask_bits


def test_mask_bits_known_value():
    assert mask_bits(torch.tensor([True, False, False, True])) == "1001"
    assert bits_mask("1001").tolist() == [True, False, False, True]


@given(st.lists(st.booleans(), max_size=2000))
def test_mask_round_trips_through_its_bits(values):
    mask = torch.tensor(values, dtype=torch.bool)
    bits = mask_bits(mask)
    assert len(bits) == len(values) and set(bits) <= {"0", "1"}
    back = bits_mask(bits)
    assert back.dtype == torch.bool and torch.equal(back, mask)
