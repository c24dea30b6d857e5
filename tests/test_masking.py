"""The gradient-masking rules of fosctrain.masking that hold without a model (the checks on
models run through evaluate() in test_evaluate.py)."""

from __future__ import annotations

from fosctrain.masking import large_eps


def test_large_eps_rule():
    assert large_eps([0.3]) == 1.0
    assert large_eps([8 / 255]) == 0.5
    assert large_eps([0.1, 0.2]) == 0.8
    assert large_eps([0.5], "l2") == 2.0
