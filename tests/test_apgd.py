"""APGD run by the engine (fosctrain.attacks.apgd): its checkpoint schedule by hand, agreement
with torchattacks' APGD (the reference code) step for step, and the engine's promises under
APGD: FOSC at the returned point, stopping rules, compaction that changes only the cost."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from fosctrain.attacks import APGD, APGDL2, FoscThreshold, MisclassifiedTau, create_attack
from fosctrain.attacks.apgd import checkpoints
from fosctrain.fosc import fosc
from fosctrain.losses import input_gradient


def test_checkpoints_by_hand():
    # 100 steps: first window 22, then 3 shorter each time down to 6
    assert checkpoints(100) == [
        (22, 22),
        (41, 19),
        (57, 16),
        (70, 13),
        (80, 10),
        (87, 7),
        (93, 6),
        (99, 6),
    ]
    assert checkpoints(10) == [(2, 2), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1),
                               (10, 1)]  # fmt: skip
    assert checkpoints(5) == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]


def test_checkpoint_decisions_by_hand():
    """Five steps: a checkpoint after every evaluation, window 1. Hand-made objectives show the
    reference's rules: the first step is compared with 0, not with the start (so sample 0's
    fall from 5 to 3 counts as a rise); a step that does not raise the objective halves the
    step size and moves the sample back to its best point; a sample not halved at the last
    check whose best did not improve since is halved too."""
    steps = APGD(eps=0.25, steps=5).optimizer(0.25, 0.5, 5, torch.zeros(2, 1, 1, 1))
    active = torch.arange(2)
    points = [torch.full((2, 1, 1, 1), float(k)) for k in range(5)]
    grad, f = torch.ones(2, 1, 1, 1), torch.tensor([0.1, 0.2])

    def observe(k, values):
        return steps.observe(k, active, points[k], torch.tensor(values), grad, f)

    observe(0, [5.0, 5.0])
    observe(1, [3.0, 6.0])
    assert steps.eta.tolist() == [0.5, 0.5]
    xs, _, _ = observe(2, [4.0, 7.0])  # sample 0 rose but its best (5) stalled: halved
    assert steps.eta.tolist() == [0.25, 0.5]
    assert xs.flatten().tolist() == [0.0, 2.0]  # back to its best point, the start
    xs, _, _ = observe(3, [4.5, 6.5])  # sample 1 fell: halved, back to evaluation 2
    assert steps.eta.tolist() == [0.25, 0.25]
    assert xs.flatten().tolist() == [3.0, 2.0]
    xs, _, _ = observe(4, [4.8, 7.5])  # sample 0 stalled again; sample 1 was just halved
    assert steps.eta.tolist() == [0.125, 0.25]
    assert xs.flatten().tolist() == [0.0, 4.0]
    assert steps.best_value.tolist() == [5.0, 7.5]


def reference_start(x0, eps, norm, generator):
    """torchattacks' APGD start: a uniform draw scaled so its largest coordinate is eps."""
    t = 2 * torch.rand(x0.shape) - 1
    return x0 + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps", [10, 25])
def test_matches_torchattacks_apgd(shared_cnn, shared_batch, steps):
    x, y = shared_batch
    torch.manual_seed(3)
    ours = APGD(eps=0.3, steps=steps)(shared_cnn, x, y, start=reference_start)
    torch.manual_seed(3)
    ref = torchattacks.APGD(shared_cnn, eps=0.3, steps=steps, loss="ce")
    x_best, _, loss_best, _ = ref.attack_single_run(x, y)
    assert torch.allclose(ours.x_adv, x_best, atol=1e-5)
    _, _, values = input_gradient(shared_cnn, ours.x_adv, y)
    assert torch.allclose(values, loss_best, atol=1e-4)
    assert ours.grad_evals == len(y) * (steps + 1)  # the start and every step's point
    assert bool((ours.steps == steps).all()) and not bool(ours.stopped.any())


def test_returns_best_point_with_its_fosc(shared_cnn, shared_batch):
    x, y = shared_batch
    result = APGD(eps=0.3, steps=10, seed=0)(shared_cnn, x, y)
    grad, _, values = input_gradient(shared_cnn, result.x_adv, y)
    assert torch.allclose(result.fosc, fosc(result.x_adv, x, grad, 0.3), rtol=1e-5, atol=1e-6)
    _, _, start_values = input_gradient(shared_cnn, result.x_start, y)
    assert bool((values >= start_values - 1e-6).all())  # the best is never below the start
    assert (result.x_adv - x).abs().max() <= 0.3 + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1


def test_stopping_rule_stops_where_fosc_meets_target(shared_cnn, shared_batch):
    x, y = shared_batch
    full = APGD(eps=0.3, steps=10, seed=0)(shared_cnn, x, y)
    target = float(full.fosc_trace[3].nanquantile(0.5))
    rule = APGD(eps=0.3, steps=10, seed=0, stop=FoscThreshold(target), min_steps=1)
    result = rule(shared_cnn, x, y)
    assert result.stopped.any() and not result.stopped.all()
    assert bool((result.fosc[result.stopped] <= target).all())
    assert result.grad_evals < full.grad_evals
    grad, _, _ = input_gradient(shared_cnn, result.x_adv, y)
    measured = fosc(result.x_adv, x, grad, 0.3)
    assert torch.allclose(result.fosc, measured, rtol=1e-4, atol=1e-5)
    # a rule that never stops anyone leaves APGD exactly as it was
    never = APGD(eps=0.3, steps=10, seed=0, stop=FoscThreshold(-1.0))(shared_cnn, x, y)
    assert torch.equal(never.x_adv, full.x_adv)


def test_compaction_changes_cost_not_result(shared_cnn, shared_batch):
    x, y = shared_batch
    full = APGD(eps=0.3, steps=10, seed=0)(shared_cnn, x, y)
    target = float(full.fosc_trace[2].nanquantile(0.7))
    runs = [
        APGD(eps=0.3, steps=10, seed=0, stop=FoscThreshold(target), compact=c)(shared_cnn, x, y)
        for c in (True, False)
    ]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].steps, runs[1].steps)
    assert runs[0].grad_evals < runs[1].grad_evals


def test_l2_form_stays_in_ball(shared_cnn, shared_batch):
    x, y = shared_batch
    attack = create_attack("apgd", norm="l2", eps=1.5, steps=10, seed=0)
    assert type(attack) is APGDL2 and attack.step_size == 3.0
    result = attack(shared_cnn, x, y)
    assert (result.x_adv - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-4
    _, _, values = input_gradient(shared_cnn, result.x_adv, y)
    _, _, start = input_gradient(shared_cnn, result.x_start, y)
    assert bool((values >= start - 1e-6).all())


def test_the_rule_sees_the_point_it_returns(shared_cnn, shared_batch):
    """A rule decides on the point just evaluated, before a checkpoint may move the sample back
    to its best point: FAT's rule (stop at the first misclassified point) under APGD returns
    misclassified points only, and every stopped sample's FOSC is its trace's at that step."""
    x, _ = shared_batch
    with torch.no_grad():
        y = shared_cnn(x).argmax(1)  # every digit starts correctly classified
    for eps in (0.001, 0.002, 0.004):
        attack = APGD(eps=eps, steps=10, seed=0, stop=MisclassifiedTau(0))
        result = attack(shared_cnn, x, y)
        stopped = result.stopped
        assert stopped.any() and not stopped.all()
        with torch.no_grad():
            fooled = shared_cnn(result.x_adv).argmax(1) != y
        assert bool(fooled[stopped].all())
        at_stop = result.fosc_trace[result.steps[stopped], stopped.nonzero().squeeze(1)]
        assert torch.equal(result.fosc[stopped], at_stop)
