"""FOSC (fosctrain.fosc): closed forms against an independent float64 NumPy re-derivation,
brute force over the threat set's vertices, invariants (also as hypothesis properties on 4-D
batches), the gradient-scale pitfall, fosc_stats, and the scale-free relative FOSC."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROPERTIES, budgets, seeds, shapes
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fosctrain.attacks import AttackSpec, run_attack
from fosctrain.attacks.engine import project
from fosctrain.config import Config, validate
from fosctrain.errors import UserError
from fosctrain.fosc import (
    box_exact,
    fosc,
    fosc_half_range,
    fosc_stats,
    point_fosc,
    relative_fosc,
)
from fosctrain.losses import cross_entropy, input_gradient, objective

# ----------------------------------------------------------------------------- references
# Written from PAPER.md section 2 in float64 NumPy, independently of the implementation.


def ref_linf_paper(x, x0, g, eps):
    """eps * ||g||_1 - <x - x0, g>, per row of flattened arrays."""
    return eps * np.abs(g).sum(1) - ((x - x0) * g).sum(1)


def ref_linf_box(x, x0, g, eps, lo=0.0, hi=1.0):
    """sum_i [g_i > 0] g_i (h_i - x_i) + [g_i < 0] g_i (l_i - x_i), l/h the clipped ball."""
    low = np.maximum(x0 - eps, lo)
    high = np.minimum(x0 + eps, hi)
    pos = np.where(g > 0, g * (high - x), 0.0)
    neg = np.where(g < 0, g * (low - x), 0.0)
    return (pos + neg).sum(1)


def ref_l2(x, x0, g, eps):
    return eps * np.sqrt((g * g).sum(1)) - ((x - x0) * g).sum(1)


def _np_case(rng, n, d, eps, norm, zero_frac=0.2):
    """x0 in [0, 1]^d (some pixels exactly 0 or 1), x inside the threat set, gradients with
    exact zeros."""
    x0 = rng.uniform(0, 1, (n, d))
    edge = rng.uniform(size=(n, d))
    x0[edge < 0.1] = 0.0
    x0[edge > 0.9] = 1.0
    if norm == "linf":
        x = np.clip(x0 + rng.uniform(-eps, eps, (n, d)), 0.0, 1.0)
        # Some coordinates exactly on the (clipped) faces, as PGD leaves them.
        face = rng.uniform(size=(n, d))
        x = np.where(face < 0.2, np.clip(x0 + eps, 0, 1), x)
        x = np.where(face > 0.8, np.clip(x0 - eps, 0, 1), x)
    else:
        direction = rng.normal(size=(n, d))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = eps * rng.uniform(0, 1, (n, 1))
        radius[0] = eps  # one row on the sphere
        x = x0 + direction * radius
    g = rng.normal(size=(n, d))
    g[rng.uniform(size=(n, d)) < zero_frac] = 0.0
    if n > 1:
        g[1] = 0.0  # one all-zero gradient row
    return x, x0, g


def _t(a, dtype=torch.float64, shape=None):
    t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return t if shape is None else t.reshape(shape)


# -------------------------------------------------------------- against the NumPy formulas


@pytest.mark.parametrize("eps", [1e-3, 8 / 255, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("form", ["paper", "box"])
def test_linf_matches_numpy(eps, form):
    rng = np.random.default_rng(int(eps * 1e4) + (form == "box"))
    n, shape = 12, (1, 6, 7)
    d = math.prod(shape)
    x, x0, g = _np_case(rng, n, d, eps, "linf")
    bounds = (0.0, 1.0) if form == "box" else None
    ref = ref_linf_box(x, x0, g, eps) if form == "box" else ref_linf_paper(x, x0, g, eps)
    got64 = fosc(
        _t(x, shape=(n, *shape)),
        _t(x0, shape=(n, *shape)),
        _t(g, shape=(n, *shape)),
        eps,
        "linf",
        bounds,
    )
    assert got64.shape == (n,)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert got64[1].item() == 0.0  # zero gradient: nothing to gain
    # float32 inputs: same numbers up to float32 rounding.
    f32 = [_t(a, torch.float32, (n, *shape)) for a in (x, x0, g)]
    got32 = fosc(*f32, eps, "linf", bounds)
    assert got32.dtype == torch.float32
    scale = eps * np.abs(g).sum(1) + 1.0
    np.testing.assert_allclose(got32.double().numpy(), ref, rtol=0, atol=1e-5 * scale.max())
    assert ref.min() > -1e-12
    assert ref[[0] + list(range(2, n))].min() > 0  # nontrivial values, not all zero


@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0, 5.0])
def test_l2_matches_numpy(eps):
    rng = np.random.default_rng(int(eps * 100))
    n, shape = 10, (2, 5, 5)
    d = math.prod(shape)
    x, x0, g = _np_case(rng, n, d, eps, "l2")
    ref = ref_l2(x, x0, g, eps)
    got = fosc(
        _t(x, shape=(n, *shape)), _t(x0, shape=(n, *shape)), _t(g, shape=(n, *shape)), eps, "l2"
    )
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert got[1].item() == 0.0
    assert ref[[0] + list(range(2, n))].min() > 0
    f32 = [_t(a, torch.float32, (n, *shape)) for a in (x, x0, g)]
    np.testing.assert_allclose(fosc(*f32, eps, "l2").double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_box_bounds_other_than_unit():
    rng = np.random.default_rng(7)
    x0 = rng.uniform(-1, 1, (5, 9))
    x = np.clip(x0 + rng.uniform(-0.4, 0.4, (5, 9)), -1, 1)
    g = rng.normal(size=(5, 9))
    got = fosc(_t(x), _t(x0), _t(g), 0.4, "linf", (-1.0, 1.0))
    np.testing.assert_allclose(got.numpy(), ref_linf_box(x, x0, g, 0.4, -1.0, 1.0), rtol=1e-12)


# ------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("d", [3, 4, 5, 6])
def test_box_form_equals_max_over_box_vertices(d):
    rng = np.random.default_rng(100 + d)
    for trial in range(6):
        eps = [0.05, 0.3, 0.7][trial % 3]
        x, x0, g = _np_case(rng, 1, d, eps, "linf", zero_frac=0.25)
        x, x0, g = x[0], x0[0], g[0] if trial != 1 else np.zeros(d)
        lo, hi = np.maximum(x0 - eps, 0.0), np.minimum(x0 + eps, 1.0)
        best = max(np.dot(np.array(v) - x, g) for v in itertools.product(*zip(lo, hi, strict=True)))
        got = fosc(_t(x[None]), _t(x0[None]), _t(g[None]), eps, "linf", (0.0, 1.0)).item()
        assert got == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("d", [3, 4, 5, 6])
def test_paper_form_equals_max_over_ball_vertices(d):
    rng = np.random.default_rng(200 + d)
    for eps in (0.01, 0.3, 1.5):
        x0 = rng.uniform(0, 1, d)
        x = x0 + rng.uniform(-eps, eps, d)
        g = rng.normal(size=d)
        g[rng.integers(d)] = 0.0
        best = max(
            np.dot(np.array(v) - x, g)
            for v in itertools.product(*zip(x0 - eps, x0 + eps, strict=True))
        )
        got = fosc(_t(x[None]), _t(x0[None]), _t(g[None]), eps, "linf").item()
        assert got == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("d", [3, 4, 6])
def test_l2_form_bounds_random_search_and_is_attained(d):
    rng = np.random.default_rng(300 + d)
    for eps in (0.1, 1.0, 3.0):
        x0 = rng.uniform(0, 1, d)
        u = rng.normal(size=d)
        x = x0 + u / np.linalg.norm(u) * eps * rng.uniform()
        g = rng.normal(size=d)
        got = fosc(_t(x[None]), _t(x0[None]), _t(g[None]), eps, "l2").item()
        # Analytic maximiser: x0 + eps g / ||g|| attains the value exactly.
        xstar = x0 + eps * g / np.linalg.norm(g)
        assert np.dot(xstar - x, g) == pytest.approx(got, rel=1e-12, abs=1e-12)
        # Dense random search over the ball (sphere and interior): never above, and close.
        dirs = rng.normal(size=(200_000, d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        radii = np.concatenate([np.ones(150_000), rng.uniform(0, 1, 50_000) ** (1 / d)])
        cand = x0 + eps * dirs * radii[:, None]
        values = (cand - x) @ g
        assert values.max() <= got + 1e-12
        assert values.max() >= got - 0.02 * eps * np.linalg.norm(g)


# --------------------------------------------------------------------------- invariants

CASE = dict(
    seed=st.integers(0, 2**32 - 1),
    eps=st.floats(1e-3, 1.0),
    d=st.integers(1, 40),
)


@settings(max_examples=60, deadline=None)
@given(**CASE)
def test_nonnegative_inside_the_set_and_box_below_paper(seed, eps, d):
    rng = np.random.default_rng(seed)
    n = 8
    x, x0, g = _np_case(rng, n, d, eps, "linf")
    t = [_t(a, torch.float32) for a in (x, x0, g)]
    paper = fosc(*t, eps, "linf")
    box = fosc(*t, eps, "linf", (0.0, 1.0))
    assert paper.min().item() >= -1e-6
    assert box.min().item() >= -1e-6
    assert (box <= paper + 1e-5 * (1 + paper.abs())).all()
    # Exactly, in float64:
    t64 = [_t(a) for a in (x, x0, g)]
    assert (fosc(*t64, eps, "linf", (0.0, 1.0)) <= fosc(*t64, eps, "linf") + 1e-12).all()
    xl, x0l, gl = _np_case(rng, n, d, eps, "l2")
    assert fosc(*[_t(a, torch.float32) for a in (xl, x0l, gl)], eps, "l2").min() >= -1e-6


@settings(max_examples=60, deadline=None)
@given(**CASE)
def test_zero_at_the_vertex_maximiser_of_a_linear_loss(seed, eps, d):
    """For loss(x) = <w, x> the gradient is w everywhere; its maximiser over the set is a
    vertex (box, L-inf ball) or x0 + eps w / ||w|| (L2 ball), where FOSC must vanish."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, 1, (4, d))
    w = rng.normal(size=(4, d))
    w[rng.uniform(size=w.shape) < 0.2] = 0.0
    for dtype in (torch.float32, torch.float64):
        x0t, wt = _t(x0, dtype), _t(w, dtype)
        # The box vertex in the working precision: clip(x0 -/+ eps) where w is -/+.
        vertex = torch.where(wt > 0, (x0t + eps).clamp(max=1), (x0t - eps).clamp(min=0))
        box = fosc(vertex, x0t, wt, eps, "linf", (0.0, 1.0))
        assert torch.equal(box, torch.zeros_like(box))  # exactly: every term is 0 * w_i
        assert fosc(vertex, x0t, wt, eps, "linf").min() >= -1e-5  # paper form: >= 0
    corner = x0 + eps * np.sign(w)
    paper = fosc(_t(corner, torch.float32), _t(x0, torch.float32), _t(w, torch.float32), eps)
    assert paper.abs().max().item() <= 1e-5 * (1 + eps * np.abs(w).sum(1).max())
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    on_sphere = x0 + eps * w / np.where(norms > 0, norms, 1)
    l2 = fosc(_t(on_sphere), _t(x0), _t(w), eps, "l2")
    assert l2.abs().max().item() <= 1e-12 * (1 + eps * norms.max())


def test_box_form_zero_where_paper_form_is_not_at_a_pixel_clipped_stationary_point():
    """x0 has saturated pixels; x = clip(x0 + eps sign(g), 0, 1) is the box maximiser of the
    linear loss <g, x>, a KKT point of the real threat set. The box form is 0 there, the paper
    form still counts the unreachable gain of the clipped pixels."""
    eps = 0.3
    x0 = torch.tensor([[1.0, 0.0, 0.9, 0.5, 0.05, 0.5]], dtype=torch.float64)
    g = torch.tensor([[2.0, -3.0, 1.0, -0.5, -1.0, 0.0]], dtype=torch.float64)
    x = torch.clamp(x0 + eps * g.sign(), 0, 1)
    box = fosc(x, x0, g, eps, "linf", (0.0, 1.0))
    paper = fosc(x, x0, g, eps, "linf")
    assert box.item() == 0.0
    # Gain the paper form still sees: pixel 0 (+0.3 * 2), pixel 1 (0.3 * 3), pixel 2
    # (0.2 * 1), pixel 4 (0.25 * 1); pixel 3 and 5 are not clipped / have no gradient.
    assert paper.item() == pytest.approx(0.6 + 0.9 + 0.2 + 0.25, abs=1e-12)


def test_per_sample_independence_under_permutation():
    gen = torch.Generator().manual_seed(3)
    n = 16
    x0 = torch.rand(n, 1, 5, 5, generator=gen)
    x = (x0 + (torch.rand(n, 1, 5, 5, generator=gen) - 0.5) * 0.4).clamp(0, 1)
    g = torch.randn(n, 1, 5, 5, generator=gen)
    perm = torch.randperm(n, generator=gen)
    for norm, bounds in (("linf", None), ("linf", (0.0, 1.0)), ("l2", None)):
        full = fosc(x, x0, g, 0.2, norm, bounds)
        assert torch.equal(fosc(x[perm], x0[perm], g[perm], 0.2, norm, bounds), full[perm])
        # Changing one sample changes only its own value.
        g2 = g.clone()
        g2[5] *= -3
        changed = fosc(x, x0, g2, 0.2, norm, bounds)
        assert not torch.equal(changed[5], full[5])
        keep = torch.arange(n) != 5
        assert torch.equal(changed[keep], full[keep])


def test_scale_sum_reduction_is_batch_size_independent_mean_shrinks_by_batch(cnn, batch):
    x0, y = batch
    n = x0.shape[0]
    gen = torch.Generator().manual_seed(5)
    eps = 0.3
    x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    grad, _, _ = input_gradient(cnn, x, y)
    full = fosc(x, x0, grad, eps)
    assert full.min() > 0
    # Each sample's own gradient: the same FOSC whether it is computed in the full batch,
    # in a batch of 16, or alone.
    for part in (slice(0, 16), slice(40, 41)):
        g_part, _, _ = input_gradient(cnn, x[part], y[part])
        torch.testing.assert_close(
            fosc(x[part], x0[part], g_part, eps), full[part], rtol=1e-4, atol=1e-6
        )
    # The batch-mean gradient shrinks every FOSC by exactly the batch size.
    xr = x.clone().requires_grad_(True)
    (g_mean,) = torch.autograd.grad(cross_entropy(cnn(xr), y).mean(), xr)
    for bounds in (None, (0.0, 1.0)):
        ratio = fosc(x, x0, grad, eps, "linf", bounds) / fosc(x, x0, g_mean, eps, "linf", bounds)
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(n)), rtol=1e-5, atol=0)


def test_unknown_norm_and_l2_box_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(UserError, match="norm"):
        fosc(x, x, x, 0.1, "l1")
    with pytest.raises(UserError, match="linf"):
        fosc(x, x, x, 0.1, "l2", (0.0, 1.0))


def test_box_exact_fosc_is_linf_only_raised_or_downgraded_by_one_rule():
    assert box_exact("linf", True) is True and box_exact("linf", False) is False
    assert box_exact("l2", False) is False and box_exact("l2", True, downgrade=True) is False
    with pytest.raises(UserError, match=r"box-exact FOSC \(--fosc-box\) .* linf, not l2"):
        box_exact("l2", True)
    with pytest.raises(UserError, match="unknown norm"):
        box_exact("l1", True)
    # where it raised it raises: the FOSC math, the engine, the configuration
    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 3))
    box = (0.0, 1.0)
    for refused in (
        lambda: fosc(x, x, x, 0.1, "l2", box),
        lambda: fosc_half_range(x, x, 0.1, "l2", box),
        lambda: run_attack(model, x, y, AttackSpec(1.0, 0.1, 1, norm="l2", fosc_box=True)),
        lambda: validate(Config(norm="l2", eps=2.0, fosc_box=True)),
    ):
        with pytest.raises(UserError, match="box-exact.*--fosc-box"):
            refused()
    # where it downgraded it downgrades: the evaluation's FOSC of a point
    downgraded = point_fosc(model, x, x.flip(0), y, 1.0, norm="l2", fosc_box=True)
    ball = point_fosc(model, x, x.flip(0), y, 1.0, norm="l2", fosc_box=False)
    for a, b in zip(downgraded, ball, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nothing_but_box_exact_restates_the_box_rule():
    """No test outside box_exact compares a norm with "linf" next to a box flag."""
    src = Path(__file__).resolve().parents[1] / "src" / "fosctrain"
    found = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "box_exact"
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.BoolOp | ast.If | ast.IfExp):
                continue
            test = node if isinstance(node, ast.BoolOp) else node.test
            parts = list(ast.walk(test))
            names = {getattr(n, "id", None) or getattr(n, "attr", "") for n in parts}
            linf = any(isinstance(n, ast.Constant) and n.value == "linf" for n in parts)
            if linf and any("box" in (name or "") for name in names):
                found.append(f"{path.relative_to(src)}:{node.lineno}")
    assert found == []


# ---------------------------------------------------------------------------- fosc_stats


def test_fosc_stats_known_vector_ignores_nan():
    values = torch.tensor([3.0, float("nan"), 1.0, 10.0, 2.0, float("nan"), 4.0])
    values = torch.cat([values, torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0])])  # 1..10 and 2 NaN
    s = fosc_stats(values)
    assert set(s) == {"mean", "median", "p10", "p90", "max"}
    assert s["mean"] == pytest.approx(5.5)
    assert s["median"] == pytest.approx(5.5)
    # Linear interpolation between order statistics (numpy's default percentile).
    assert s["p10"] == pytest.approx(1.9)
    assert s["p90"] == pytest.approx(9.1)
    assert s["max"] == 10.0
    ref = np.arange(1.0, 11.0)
    assert s["p10"] == pytest.approx(np.percentile(ref, 10))
    assert s["p90"] == pytest.approx(np.percentile(ref, 90))
    assert all(isinstance(v, float) for v in s.values())


def test_fosc_stats_single_value_all_nan_and_empty():
    one = fosc_stats(torch.tensor([float("nan"), 0.25]))
    assert one == {"mean": 0.25, "median": 0.25, "p10": 0.25, "p90": 0.25, "max": 0.25}
    for empty in (torch.full((4,), float("nan")), torch.zeros(0)):
        assert all(math.isnan(v) for v in fosc_stats(empty).values())
        assert set(fosc_stats(empty)) == {"mean", "median", "p10", "p90", "max"}


# ------------------------------------------------------------------------ properties on 4-D batches
# Whole N x C x H x W batches drawn by hypothesis, the iterate put inside the set with the
# engine's `project` as PGD does (the invariants above draw flat vectors).


def _case(shape, eps, seed, norm="linf", dtype=torch.float64):
    """x0 in [0,1], x = a projected random point of the threat set, g with some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=dtype)
    # Some pixels sit on the box faces, where clipping matters.
    x0 = torch.where(torch.rand(shape, generator=gen, dtype=dtype) < 0.2, x0.round(), x0)
    step = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * 3 * eps
    x = project(x0 + step, x0, eps, norm, (0.0, 1.0))
    g = torch.randn(shape, generator=gen, dtype=dtype)
    g = torch.where(torch.rand(shape, generator=gen, dtype=dtype) < 0.15, torch.zeros_like(g), g)
    return x, x0, g


def _tol(g: torch.Tensor, eps: float) -> torch.Tensor:
    """Rounding allowance: a few ulps of the largest term eps * ||g||_1."""
    scale = 1 + eps * g.flatten(1).abs().sum(1)
    return scale * 8 * torch.finfo(g.dtype).eps


@PROPERTIES
@given(shape=shapes, eps=budgets, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fosc_nonnegative_inside_the_set_and_box_below_paper(shape, eps, seed, dtype):
    x, x0, g = _case(shape, eps, seed, dtype=dtype)
    paper = fosc(x, x0, g, eps, "linf")
    box = fosc(x, x0, g, eps, "linf", (0.0, 1.0))
    tol = _tol(g, eps)
    assert paper.shape == box.shape == (shape[0],)
    assert (paper >= -tol).all()
    assert (box >= -tol).all()
    assert (box <= paper + tol).all()


@PROPERTIES
@given(shape=shapes, eps=budgets, seed=seeds)
def test_fosc_zero_at_the_vertex_maximiser(shape, eps, seed):
    """For a linear loss <g, x> the maximiser over the set is a vertex: FOSC vanishes there."""
    _, x0, g = _case(shape, eps, seed, dtype=torch.float32)
    hi, lo = (x0 + eps).clamp(max=1), (x0 - eps).clamp(min=0)
    vertex = torch.where(g > 0, hi, lo)
    box = fosc(vertex, x0, g, eps, "linf", (0.0, 1.0))
    assert torch.equal(box, torch.zeros_like(box))  # every term is exactly 0 * g_i
    corner = x0 + eps * g.sign()  # the ball's vertex (outside the pixel box: paper form only)
    paper = fosc(corner, x0, g, eps, "linf")
    assert (paper.abs() <= _tol(g, eps) * 4).all()
    # And it is the maximum: any other point of the set has FOSC >= the vertex's (= 0) and
    # a linear objective no larger than the vertex's.
    gen = torch.Generator().manual_seed(seed + 1)
    step = (torch.rand(shape, generator=gen) * 2 - 1) * 3 * eps
    x = project(x0 + step, x0, eps, "linf", (0.0, 1.0))
    assert ((x * g).flatten(1).sum(1) <= (vertex * g).flatten(1).sum(1) + _tol(g, eps)).all()


@PROPERTIES
@given(shape=shapes, eps=budgets, seed=seeds)
def test_fosc_l2_form(shape, eps, seed):
    x, x0, g = _case(shape, eps, seed, norm="l2")
    c = fosc(x, x0, g, eps, "l2")
    gn = g.flatten(1).norm(dim=1)
    assert (c >= -1e-12 * (1 + eps * gn)).all()
    # Zero at the L2 maximiser x0 + eps g / ||g||; equal to the closed form eps ||g|| - <d, g>.
    on_sphere = x0 + eps * g / gn.clamp_min(1e-300).view(-1, 1, 1, 1)
    assert (fosc(on_sphere, x0, g, eps, "l2").abs() <= 1e-12 * (1 + eps * gn)).all()
    expected = eps * gn - ((x - x0) * g).flatten(1).sum(1)
    assert torch.allclose(c, expected, rtol=0, atol=1e-12)


@PROPERTIES
@given(shape=shapes, eps=budgets, seed=seeds, k=st.floats(1e-3, 1e3))
def test_fosc_is_positively_homogeneous_in_the_gradient_and_per_sample(shape, eps, seed, k):
    x, x0, g = _case(shape, eps, seed)
    for bounds in (None, (0.0, 1.0)):
        c = fosc(x, x0, g, eps, "linf", bounds)
        scaled = fosc(x, x0, k * g, eps, "linf", bounds)
        assert ((scaled - k * c).abs() <= k * _tol(g, eps)).all()  # up to cancellation
        perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(fosc(x[perm], x0[perm], g[perm], eps, "linf", bounds), c[perm])


# --------------------------------------------------------------------------- relative FOSC


def _numpy_relative(x, x0, g, eps, norm, bounds=None):
    x, x0, g = (t.double().flatten(1).numpy() for t in (x, x0, g))
    if bounds is not None:
        lo, hi = np.maximum(x0 - eps, bounds[0]), np.minimum(x0 + eps, bounds[1])
        c = np.where(g > 0, g * (hi - x), g * (lo - x)).sum(1)
        half = 0.5 * (np.abs(g) * (hi - lo)).sum(1)
    else:
        radius = np.abs(g).sum(1) if norm == "linf" else np.linalg.norm(g, axis=1)
        c = eps * radius - ((x - x0) * g).sum(1)
        half = eps * radius
    return c / half


@pytest.mark.parametrize(("norm", "box"), [("linf", False), ("linf", True), ("l2", False)])
def test_relative_fosc_matches_numpy_and_lies_in_0_2(norm, box):
    gen = torch.Generator().manual_seed(0)
    eps = 0.3 if norm == "linf" else 1.5
    x0 = torch.rand(40, 1, 6, 6, generator=gen)
    x = x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps
    if norm == "l2":
        d = (x - x0).flatten(1)
        x = x0 + (d * (eps / d.norm(dim=1, keepdim=True)).clamp(max=1)).view_as(x0)
    bounds = (0.0, 1.0) if box else None
    if box:
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
    g = torch.randn(x0.shape, generator=gen)
    rel = relative_fosc(x, x0, g, eps, norm, bounds)
    expected = _numpy_relative(x, x0, g, eps, norm, bounds)
    np.testing.assert_allclose(rel.double().numpy(), expected, rtol=1e-5)
    assert float(rel.min()) >= 0 and float(rel.max()) <= 2 + 1e-6
    at_center = relative_fosc(x0, x0, g, eps, norm, None if box else bounds)
    torch.testing.assert_close(at_center, torch.ones(40))  # 1 at x0 (paper form, L2)


def test_relative_fosc_brute_force_on_tiny_boxes_and_circles():
    """L-inf box: FOSC and the linearized loss's range by enumerating the box's 2^3 vertices;
    L2 in 2-d: by a dense sweep of the circle."""
    gen = torch.Generator().manual_seed(1)
    eps = 0.4
    for _ in range(20):
        x0 = torch.rand(1, 3, generator=gen)
        lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
        x = lo + torch.rand(1, 3, generator=gen) * (hi - lo)
        g = torch.randn(1, 3, generator=gen)
        values = [
            float((torch.where(torch.tensor(corner), hi, lo) * g).sum())
            for corner in itertools.product([False, True], repeat=3)
        ]
        c = max(values) - float((x * g).sum())
        expected = c / ((max(values) - min(values)) / 2)
        got = relative_fosc(x, x0, g, eps, "linf", (0.0, 1.0))
        assert float(got) == pytest.approx(expected, rel=1e-5)
    angles = torch.linspace(0, 2 * math.pi, 200001, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()], 1)
    for _ in range(10):
        x0, g = torch.randn(1, 2, generator=gen).double(), torch.randn(1, 2, generator=gen).double()
        x = x0 + torch.randn(1, 2, generator=gen).double().clamp(-0.5, 0.5) * eps
        linear = ((x0 + eps * circle) * g).sum(1)
        c = float(linear.max()) - float((x * g).sum())
        expected = c / (float(linear.max() - linear.min()) / 2)
        assert float(relative_fosc(x, x0, g, eps, "l2")) == pytest.approx(expected, rel=1e-6)


def test_relative_fosc_is_free_of_the_gradients_scale():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(16, 1, 5, 5, generator=gen)
    x = (x0 + (torch.rand(x0.shape, generator=gen) - 0.5) * 0.5).clamp(0, 1)
    g = torch.randn(x0.shape, generator=gen)
    for norm, bounds in (("linf", None), ("linf", (0.0, 1.0)), ("l2", None)):
        base = relative_fosc(x, x0, g, 0.3, norm, bounds)
        for k in (1e-4, 0.37, 3.0, 2.0**7, 1e5):
            torch.testing.assert_close(relative_fosc(x, x0, k * g, 0.3, norm, bounds), base)
            assert not torch.allclose(fosc(x, x0, k * g, 0.3, norm, bounds), base)
    zero = relative_fosc(x, x0, torch.zeros_like(g), 0.3)
    assert zero.tolist() == [0.0] * 16  # g = 0: stationary, not NaN
    assert fosc_half_range(x0, g, 0.3).tolist() == pytest.approx(
        (0.3 * g.flatten(1).abs().sum(1)).tolist()
    )


def test_point_fosc_is_half_the_relative_fosc_and_nan_at_zero_gradient():
    """One meaning: point_fosc's relative value is relative_fosc / 2 (in [0, 1]), box-exact as
    asked (downgraded for L2, see box_exact), NaN where relative_fosc says 0 (no gradient)."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 1, 5, 5, generator=gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 3))
    y = torch.zeros(8, dtype=torch.long)
    x = (x0 + 0.1).clamp(0, 1)
    grad, _, _ = input_gradient(model, x, y, objective("ce"))
    for norm, box in (("linf", False), ("linf", True), ("l2", False), ("l2", True)):
        bounds = (0.0, 1.0) if box and norm == "linf" else None
        c, rel = point_fosc(model, x0, x, y, 0.3, norm=norm, fosc_box=box)
        torch.testing.assert_close(c, fosc(x, x0, grad, 0.3, norm, bounds), rtol=0, atol=0)
        half = relative_fosc(x, x0, grad, 0.3, norm, bounds) / 2
        torch.testing.assert_close(rel, half, rtol=0, atol=0)
    zero = nn.Sequential(nn.Flatten(), nn.Linear(25, 3))
    nn.init.zeros_(zero[1].weight)
    _, rel0 = point_fosc(zero, x0, x, y, 0.3)
    assert torch.isnan(rel0).all()
