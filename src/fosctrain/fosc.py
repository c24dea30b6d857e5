"""FOSC, the First-Order Stationary Condition of the inner maximization (Wang et al., ICML 2019).

For the constrained problem max_{x in X(x0)} loss(x), the FOSC value at a point x_k with input
gradient g = grad_x loss(x_k) is

    c(x_k) = max_{x in X(x0)} < x - x_k , g >

the largest first-order gain still available inside the threat set. It is >= 0 for x_k in the
set and 0 exactly at a first-order stationary (KKT) point; smaller means better converged.
All functions here return one value per sample.

Relative FOSC (beyond the paper) is `relative_fosc`: FOSC over the half range of the
linearized loss over the threat set, in [0, 2], 1 at x0, free of the gradient's scale; DAT's
--fosc-relative stops on it and its targets (c_max) are on that scale. The evaluation report
(`point_fosc`, eval.json's rel_* and relative_* numbers) prints half of it, FOSC over the whole
range, in [0, 1] (about 0.5 at a random point): the same quantity on the scale those reports
have always used, kept so that numbers already reported stay comparable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fosctrain.errors import UserError
from fosctrain.losses import input_gradient, objective
from fosctrain.threat import BOUNDS, check_norm


def box_exact(norm: str, fosc_box: bool, *, downgrade: bool = False) -> bool:
    """Whether FOSC is measured box-exact; the one statement of the rule that box-exact FOSC is
    defined for the L-inf ball only (over the ball intersected with the pixel box the maximizer
    is a vertex of a box; an L2 ball intersected with the box has no such closed form).

    `fosc_box` with norm "l2" raises UserError or, with `downgrade`, gives False: the ball's own
    FOSC, for callers whose box-exact default also serves L2 runs (the evaluation's)."""
    if not fosc_box or check_norm(norm) == "linf":
        return bool(fosc_box)
    if downgrade:
        return False
    raise UserError(f"box-exact FOSC (--fosc-box) is only defined for norm linf, not {norm}")


def _box(x0: Tensor, eps: float, bounds: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """The corners l, h of the eps-box around x0 intersected with the pixel box."""
    return torch.clamp(x0 - eps, min=bounds[0]), torch.clamp(x0 + eps, max=bounds[1])


def fosc(
    x: Tensor,
    x0: Tensor,
    grad: Tensor,
    eps: float,
    norm: str = "linf",
    bounds: tuple[float, float] | None = None,
) -> Tensor:
    """FOSC per sample for the threat set centred at x0.

    norm="linf", bounds=None (the paper's closed form over the L-inf ball):
        c = eps * ||g||_1 - < x - x0 , g >
    norm="linf", bounds=(lo, hi) (exact over the ball intersected with the pixel box): the
    maximizer of a linear function over a box is a vertex, so with
    l = max(x0 - eps, lo), h = min(x0 + eps, hi),
        c = sum_i [g_i > 0] g_i (h_i - x_i) + [g_i < 0] g_i (l_i - x_i)
    which is <= the paper form and is 0 at pixel-clipped stationary points.
    norm="l2", bounds=None (the L2 ball):
        c = eps * ||g||_2 - < x - x0 , g >
    g must be each sample's own gradient (see fosctrain.losses.input_gradient).
    """
    check_norm(norm)
    g = grad.flatten(1)
    if box_exact(norm, bounds is not None):
        lo, hi = _box(x0, eps, bounds)
        vertex = torch.where(grad > 0, hi, lo)
        return ((vertex - x).flatten(1) * g).sum(1)
    d = (x - x0).flatten(1)
    radius = g.abs().sum(1) if norm == "linf" else g.norm(dim=1)
    return eps * radius - (d * g).sum(1)


def fosc_stats(values: Tensor) -> dict[str, float]:
    """Mean, median, 10th and 90th percentile and max of FOSC values, ignoring NaN."""
    v = values[~torch.isnan(values)].double()
    if v.numel() == 0:
        return {k: float("nan") for k in ("mean", "median", "p10", "p90", "max")}
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype))
    return {
        "mean": v.mean().item(),
        "median": q[1].item(),
        "p10": q[0].item(),
        "p90": q[2].item(),
        "max": v.max().item(),
    }


def fosc_half_range(
    x0: Tensor,
    grad: Tensor,
    eps: float,
    norm: str = "linf",
    bounds: tuple[float, float] | None = None,
) -> Tensor:
    """Half of max - min of the linearized loss <z, g> over the threat set around x0, per
    sample: eps * ||g||_1 (L-inf), eps * ||g||_2 (L2) or, box-aware (norm="linf",
    bounds=(lo, hi)), sum_i |g_i| (h_i - l_i) / 2 with l, h as in `fosc`. FOSC lies in
    [0, 2 * this] at points of the set, and equals it at x0 (paper form and L2)."""
    check_norm(norm)
    g = grad.flatten(1)
    if box_exact(norm, bounds is not None):
        lo, hi = _box(x0, eps, bounds)
        return 0.5 * (g.abs() * (hi - lo).flatten(1)).sum(1)
    return eps * (g.abs().sum(1) if norm == "linf" else g.norm(dim=1))


def _ratio(c: Tensor, scale: Tensor, where_zero: float) -> Tensor:
    """c / scale per sample, `where_zero` where the scale is 0 (no gradient, no room)."""
    return torch.where(scale > 0, c / scale.clamp_min(1e-30), torch.full_like(c, where_zero))


def relative_fosc(
    x: Tensor,
    x0: Tensor,
    grad: Tensor,
    eps: float,
    norm: str = "linf",
    bounds: tuple[float, float] | None = None,
) -> Tensor:
    """Relative FOSC per sample, in [0, 2] at points of the threat set (beyond the paper):

        c / (eps * ||g||_1)   (L-inf),   c / (eps * ||g||_2)   (L2),
        c / fosc_half_range   (box-aware L-inf)

    1 at x0 (paper form and L2), 0 at a stationary point, and unchanged when the loss (so g) is
    multiplied by a positive constant, so one target means the same for every model, data set
    and eps. DAT's `--fosc-relative` stops on it. 0 where the half range is 0 (g = 0, or no
    room to move): c is 0 there too, a stationary point for the rule."""
    c = fosc(x, x0, grad, eps, norm, bounds)
    return _ratio(c, fosc_half_range(x0, grad, eps, norm, bounds), 0.0)


def point_fosc(
    model: nn.Module,
    x0: Tensor,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "linf",
    fosc_box: bool = True,
    loss: str = "ce",
) -> tuple[Tensor, Tensor]:
    """FOSC at the points x (threat set around x0) and, as the evaluation reports it, relative
    FOSC on its half scale: relative_fosc / 2, FOSC over the range of the linearized loss over
    the threat set, in [0, 1]. A uniformly random point of the set scores about 0.5 and a
    stationary point 0, whatever the gradient's scale; NaN where the gradient is zero (where
    relative_fosc says 0). Box-exact where `fosc_box` and the norm allows it (box_exact,
    downgraded for L2). Costs one input-gradient pass."""
    grad, _, _ = input_gradient(model, x, y, objective(loss))
    bounds = BOUNDS if box_exact(norm, fosc_box, downgrade=True) else None
    c = fosc(x, x0, grad, eps, norm, bounds)
    return c, _ratio(c, 2 * fosc_half_range(x0, grad, eps, norm, bounds), float("nan"))
