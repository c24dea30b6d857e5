"""The gradient-masking rules of fosctrain.masking that hold without a model (the checks on
models run through evaluate() in test_evaluate.py)."""

from __future__ import annotations

from fosctrain.masking import large_eps


def test_large_eps_rule():
    assert large_eps([0.3]) == 1.0
    assert large_eps([8 / 255]) == 0.5
    assert large_eps([0.1, 0.2]) == 0.8
    assert large_eps([0.5], "l2") == 2.0


def test_gradient_free_rule():
    from fosctrain.masking import CHECK_MARGIN, gradient_free_warnings

    # DAT seed 0 on full MNIST: FAB-T left 78.7%, Square took it to 73.3%
    (warning,) = gradient_free_warnings(0.3, 0.787, 0.733)
    assert "78.7%" in warning and "73.3%" in warning and "Square" in warning
    assert gradient_free_warnings(0.3, 0.841, 0.824) == []  # Madry PGD-10 seed 0: 1.7 points
    assert gradient_free_warnings(0.3, 0.5, 0.5 - CHECK_MARGIN / 2) == []
