"""The C&W objective against a NumPy re-derivation: its gradient vanishes only once an
example is fooled by kappa (Madry et al.'s CW-inf), untargeted and targeted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fosctrain.losses import CW_KAPPA, cw_margin, objective


def numpy_cw(z: np.ndarray, label: np.ndarray, targeted: bool, kappa: float = CW_KAPPA):
    """Value and logit gradient of -relu(z_y - max_other + kappa) (untargeted) or
    -relu(max_other - z_t + kappa) (targeted), sample by sample."""
    values, grads = [], []
    for row, k in zip(z, label, strict=True):
        others = [j for j in range(len(row)) if j != k]
        j = others[int(np.argmax(row[others]))]
        inner = (row[k] - row[j] if not targeted else row[j] - row[k]) + kappa
        g = np.zeros_like(row)
        if inner > 0:
            sign = -1.0 if not targeted else 1.0
            g[k], g[j] = sign, -sign
        values.append(-max(inner, 0.0))
        grads.append(g)
    return np.array(values), np.array(grads)


def logit_grad(fn, z: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    values = fn(z, label)
    (grad,) = torch.autograd.grad(values.sum(), z)
    return values.detach(), grad


def test_gradient_is_nonzero_while_correct_and_zero_once_fooled_by_kappa():
    # Sample 0: the true class 0 leads by 60; sample 1: it trails by 60.
    z = torch.tensor([[60.0, 0.0, -5.0], [0.0, 60.0, -5.0]])
    y = torch.tensor([0, 0])
    _, grad = logit_grad(cw_margin, z, y)
    torch.testing.assert_close(grad[0], torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(grad[1], torch.zeros(3))


def test_targeted_gradient_is_nonzero_until_the_target_leads_by_kappa():
    z = torch.tensor([[60.0, 0.0, -5.0], [0.0, 60.0, -5.0]])
    t = torch.tensor([1, 1])  # sample 0: target trails by 60; sample 1: target leads by 60
    _, grad = logit_grad(objective("cw", targeted=True), z, t)
    torch.testing.assert_close(grad[0], torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(grad[1], torch.zeros(3))


@pytest.mark.parametrize("targeted", [False, True])
def test_cw_matches_numpy(targeted):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=gen, dtype=torch.float64) * 40
    label = torch.randint(0, 10, (64,), generator=gen)
    values, grad = logit_grad(objective("cw", targeted), z, label)
    ref_values, ref_grad = numpy_cw(z.numpy(), label.numpy(), targeted)
    np.testing.assert_allclose(values.numpy(), ref_values, rtol=0, atol=1e-9)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=0, atol=1e-12)
    flat = (grad == 0).all(1)
    assert 0 < int(flat.sum()) < 64  # both regimes occur in the sample


def test_targeted_ce_is_still_the_negated_loss():
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(objective("ce", True)(z, t), -objective("ce")(z, t))
