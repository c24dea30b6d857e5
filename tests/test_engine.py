"""The attack engine (fosctrain.attacks.engine): projection onto the threat set (the eps-ball
intersected with the pixel box) on random shapes and budgets (hypothesis), and the relative
FOSC it reports and stops on when asked (fosc_relative), free of the objective's scale."""

from __future__ import annotations

import pytest
import torch
from conftest import PROPERTIES, budgets, fresh_model, seeds, shapes
from hypothesis import given
from hypothesis import strategies as st

from fosctrain.attacks import PGD, PGDL2, FoscThreshold
from fosctrain.attacks.engine import project
from fosctrain.fosc import relative_fosc
from fosctrain.losses import OBJECTIVES, cross_entropy

# --------------------------------------------------------------------------- projection


@PROPERTIES
@given(
    shape=shapes,
    eps=budgets,
    seed=seeds,
    spread=st.floats(0.0, 10.0),
    norm=st.sampled_from(["linf", "l2"]),
)
def test_project_keeps_points_in_the_set_and_is_idempotent(shape, eps, seed, spread, norm):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen)
    x = x0 + (torch.rand(shape, generator=gen) * 2 - 1) * spread  # anywhere, also far out
    p = project(x, x0, eps, norm, (0.0, 1.0))
    assert p.shape == x.shape and p.dtype == x.dtype
    assert p.min() >= 0 and p.max() <= 1
    d = (p - x0).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    again = project(p, x0, eps, norm, (0.0, 1.0))
    assert torch.allclose(again, p, rtol=0, atol=1e-6)
    if norm == "linf":
        assert torch.equal(again, p)
    # A point already inside the set is (up to rounding) left where it is.
    inside = project(x0 + (p - x0) * 0.5, x0, eps, norm, (0.0, 1.0))
    assert torch.allclose(inside, x0 + (p - x0) * 0.5, rtol=0, atol=1e-6)


@PROPERTIES
@given(shape=shapes, eps=budgets, seed=seeds)
def test_project_linf_is_the_nearest_point_of_the_set(shape, eps, seed):
    """Per coordinate, the L-inf ball intersected with the box is an interval: the projection
    is the clip onto [max(x0 - eps, 0), min(x0 + eps, 1)]."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = x0 + torch.randn(shape, generator=gen, dtype=torch.float64)
    lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
    p = project(x, x0, eps, "linf", (0.0, 1.0))
    assert torch.allclose(p, torch.minimum(torch.maximum(x, lo), hi), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- relative FOSC


def test_engine_reports_relative_fosc_when_asked(digits):
    x, y = digits
    model = fresh_model().eval()
    res = PGD(eps=0.3, steps=1, fosc_relative=True)(model, x[:16], y[:16], generator=None)
    grad = torch.autograd.grad(cross_entropy(model(res.x_start.requires_grad_()), y[:16]).sum(),
                               res.x_start)[0]  # fmt: skip
    expected = relative_fosc(res.x_start.detach(), x[:16], grad, 0.3)
    torch.testing.assert_close(res.fosc_trace[0], expected, rtol=1e-4, atol=1e-6)


def _between_middle_values(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: no sample sits on it, so rounding
    (the objective scaled by k) cannot flip a comparison."""
    v = values.sort().values
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


@pytest.mark.parametrize("cls", [PGD, PGDL2])
def test_relative_rule_stops_the_same_samples_when_the_objective_is_scaled(
    cls, digits, monkeypatch
):
    """The attack objective times k (a test-only objective): with the relative rule the same
    samples stop at the same steps at the same points; with the absolute rule they do not."""
    x, y = digits
    model = fresh_model().eval()
    eps = 0.3 if cls is PGD else 2.0

    def run(k: float, relative: bool, threshold: float):
        monkeypatch.setitem(OBJECTIVES, "scaled", lambda z, t: k * cross_entropy(z, t))
        stop = FoscThreshold(threshold)
        pgd = cls(eps=eps, steps=6, loss="scaled", fosc_relative=relative, stop=stop)
        return pgd(model, x[:48], y[:48], generator=torch.Generator().manual_seed(3))

    free = cls(eps=eps, steps=6, fosc_relative=True)(
        model, x[:48], y[:48], generator=torch.Generator().manual_seed(3)
    )
    middle = _between_middle_values(free.fosc_trace.amin(0))  # about half stop, at any step
    base = run(1.0, True, middle)
    assert 0 < int(base.stopped.sum()) < 48
    # Powers of 2 scale every float exactly; other k change the last bits, which L2's
    # normalized steps carry into maxpool ties (L-inf's sign steps do not).
    for k in (2.0**-6, 2.0**9) if cls is PGDL2 else (2.0**-6, 0.3, 7.0, 2.0**9):
        scaled = run(k, True, middle)
        assert scaled.steps.tolist() == base.steps.tolist()
        assert torch.equal(scaled.stopped, base.stopped)
        torch.testing.assert_close(scaled.x_adv, base.x_adv)
    absolute = _between_middle_values(run(1.0, False, 0.0).fosc_trace.amin(0))
    plain, big = run(1.0, False, absolute), run(2.0**9, False, absolute)
    assert plain.steps.tolist() != big.steps.tolist()  # the absolute target is not scale-free
