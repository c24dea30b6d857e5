"""`fosc attack`: FGSM is one step, FGSM-RS is its own attack, --steps is the attack's own."""

from __future__ import annotations

import re

import pytest
import torch

from fosctrain.attacks import ATTACKS, FGSM, FGSMRS, create_attack
from fosctrain.cli import main
from fosctrain.errors import UserError
from fosctrain.losses import input_gradient

N = 16


def attack_cli(capsys, *extra: str) -> tuple[int, str, str]:
    rc = main(["attack", "--n", str(N), "--eps", "0.1", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fgsm_is_one_step(capsys):
    rc, out, _ = attack_cli(capsys, "--attack", "fgsm")
    assert rc == 0
    found = re.search(r"gradient evaluations (\d+) \(mean steps ([\d.]+)\)", out)
    grad_evals, mean_steps = found.groups()
    # final_fosc adds one gradient pass at the returned points: one step costs 2 n passes.
    assert int(grad_evals) == 2 * N and float(mean_steps) == 1.0


def test_fgsm_refuses_more_steps(capsys):
    rc, _, err = attack_cli(capsys, "--attack", "fgsm", "--steps", "20")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "one step" in err
    with pytest.raises(UserError, match="one step"):
        FGSM(eps=0.1, steps=3)


@pytest.mark.parametrize(("attack", "eps"), [("pgd", "2"), ("apgd", "1.5"), ("pgd-l2", "-1")])
def test_eps_out_of_range_is_one_line(capsys, attack, eps):
    rc = main(["attack", "--n", str(N), "--attack", attack, "--eps", eps])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "eps must be" in err


def test_apgd_runs_from_the_cli_with_its_evaluations(capsys):
    rc, out, _ = attack_cli(capsys, "--attack", "apgd", "--steps", "5")
    assert rc == 0 and "(mean steps 5.00)" in out
    assert f"gradient evaluations {6 * N} " in out  # the start and every step's point


def test_steps_default_is_the_attacks_own(capsys):
    rc, out, _ = attack_cli(capsys, "--attack", "cw")
    assert rc == 0
    assert "(mean steps 30.00)" in out


def test_fgsm_rs_matches_a_hand_computation(shared_cnn, shared_batch):
    x, y = shared_batch
    eps = 0.1
    attack = create_attack("fgsm-rs", eps=eps)
    assert type(attack) is FGSMRS and attack.step_size == pytest.approx(1.25 * eps)
    assert attack.describe()["random_start"] is True
    res = attack(shared_cnn, x, y, generator=torch.Generator().manual_seed(3))
    # Wong et al.: delta ~ U(-eps, eps), one signed step of 1.25 eps, clamp to ball and box.
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * eps
    start = torch.clamp(x + delta, 0, 1)
    grad, _, _ = input_gradient(shared_cnn, start, y)
    step = start + 1.25 * eps * grad.sign()
    expected = torch.clamp(torch.min(torch.max(step, x - eps), x + eps), 0, 1)
    torch.testing.assert_close(res.x_adv, expected, rtol=0, atol=1e-6)
    assert res.steps.tolist() == [1] * x.shape[0]
    plain = FGSM(eps=eps)(shared_cnn, x, y)
    assert (res.x_adv - plain.x_adv).abs().max() > eps / 2


def test_fgsm_rs_is_registered_for_the_cli(capsys):
    assert ATTACKS["fgsm-rs"] is FGSMRS
    rc, out, _ = attack_cli(capsys, "--attack", "fgsm-rs")
    assert rc == 0 and "(mean steps 1.00)" in out
