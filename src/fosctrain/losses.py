"""Per-sample attack objectives (what the inner maximization maximizes) and training losses.

Every objective returns one value per sample, so that the gradient of their sum is each
sample's own input gradient: the scale FOSC thresholds such as c_max = 0.5 assume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fosctrain.errors import UserError

CW_KAPPA = 50.0


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: Tensor, y: Tensor, kappa: float = CW_KAPPA) -> Tensor:
    """Carlini-Wagner margin, max_{j != y} z_j - z_y, clamped below at -kappa (Madry's CW-inf)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (other.amax(1) - z_y).clamp(min=-kappa)


def kl_from_clean(logits: Tensor, p_clean: Tensor) -> Tensor:
    """KL(p_clean || softmax(logits)) per sample: TRADES' inner objective, whose "labels" are
    the clean predictive distributions."""
    log_p = torch.log(p_clean.clamp_min(1e-12))
    return (p_clean * (log_p - F.log_softmax(logits, dim=1))).sum(1)


OBJECTIVES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": cross_entropy,
    "cw": cw_margin,
    "kl": kl_from_clean,
}


def objective(name: str, targeted: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample function an attack maximizes; targeted attacks maximize its negative
    towards the target label y (for cw, the target's margin over the best other class)."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown attack loss {name!r}; choose one of {sorted(OBJECTIVES)}")
    fn = OBJECTIVES[name]
    if not targeted:
        return fn
    return lambda logits, y: -fn(logits, y)


def input_gradient(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's own input gradient of `loss` at x (sum reduction over the batch).

    Returns (grad, logits, per-sample loss). Parameter gradients are never accumulated.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        values = loss(logits, y)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return grad, logits.detach(), values.detach()
