"""FOSC, the First-Order Stationary Condition of the inner maximization (Wang et al., ICML 2019).

For the constrained problem max_{x in X(x0)} loss(x), the FOSC value at a point x_k with input
gradient g = grad_x loss(x_k) is

    c(x_k) = max_{x in X(x0)} < x - x_k , g >

the largest first-order gain still available inside the threat set. It is >= 0 for x_k in the
set and 0 exactly at a first-order stationary (KKT) point; smaller means better converged.
All functions here return one value per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fosctrain.errors import UserError
from fosctrain.losses import input_gradient, objective
from fosctrain.threat import BOUNDS, NORMS, check_norm


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
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    g = grad.flatten(1)
    if norm == "linf" and bounds is not None:
        lo, hi = _box(x0, eps, bounds)
        vertex = torch.where(grad > 0, hi, lo)
        return ((vertex - x).flatten(1) * g).sum(1)
    if bounds is not None:
        raise UserError("box-exact FOSC is only defined for norm='linf'")
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
    if norm == "linf" and bounds is not None:
        lo, hi = _box(x0, eps, bounds)
        return 0.5 * (g.abs() * (hi - lo).flatten(1)).sum(1)
    if bounds is not None:
        raise UserError("box-exact FOSC is only defined for norm='linf'")
    return eps * (g.abs().sum(1) if norm == "linf" else g.norm(dim=1))


def linear_range(x0: Tensor, grad: Tensor, eps: float, norm: str, fosc_box: bool) -> Tensor:
    """Per example, max - min of the linearized loss <z, g> over the threat set around x0
    (`fosc_box`: L-inf ball intersected with the pixel box): the largest value FOSC can take."""
    box = fosc_box and norm == "linf"
    return 2 * fosc_half_range(x0, grad, eps, norm, BOUNDS if box else None)


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
    """Scale-free FOSC per sample, in [0, 2] at points of the threat set (beyond the paper):

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
    """FOSC at the points x (threat set around x0) and relative FOSC: FOSC divided by the
    range of the linearized loss over the threat set, in [0, 1] (half of `relative_fosc`).
    A uniformly random point of the set scores about 0.5 and a stationary point 0, whatever
    the gradient's scale; NaN where the gradient is zero. Costs one input-gradient pass."""
    grad, _, _ = input_gradient(model, x, y, objective(loss))
    box = fosc_box and norm == "linf"
    c = fosc(x, x0, grad, eps, norm, BOUNDS if box else None)
    return c, _ratio(c, linear_range(x0, grad, eps, norm, box), float("nan"))
