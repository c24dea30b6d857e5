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


def _best_other(logits: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """(z_label, max_{j != label} z_j) per sample."""
    z_label = logits.gather(1, label[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(label, logits.shape[1]).bool(), float("-inf"))
    return z_label, other.amax(1)


def cw_margin(logits: Tensor, y: Tensor, kappa: float = CW_KAPPA) -> Tensor:
    """Carlini-Wagner objective of Madry et al.'s CW-inf (also TRADES, FAT):
    -relu(z_y - max_{j != y} z_j + kappa). Its gradient is non-zero until the example is
    fooled by a margin of kappa, so confidently correct examples are attacked too."""
    z_y, best_other = _best_other(logits, y)
    return -F.relu(z_y - best_other + kappa)


def cw_margin_targeted(logits: Tensor, t: Tensor, kappa: float = CW_KAPPA) -> Tensor:
    """The targeted C&W objective towards t: -relu(max_{j != t} z_j - z_t + kappa), flat only
    once the target leads every other class by kappa."""
    z_t, best_other = _best_other(logits, t)
    return -F.relu(best_other - z_t + kappa)


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
TARGETED: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cw": cw_margin_targeted}


def objective(name: str, targeted: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample function an attack maximizes. Targeted attacks (y = the target label)
    maximize the negative of the untargeted objective, except cw, whose targeted form is its
    own function (the negative of the untargeted hinge would be flat at the wrong end)."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown attack loss {name!r}; choose one of {sorted(OBJECTIVES)}")
    fn = OBJECTIVES[name]
    if not targeted:
        return fn
    if name in TARGETED:
        return TARGETED[name]
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
