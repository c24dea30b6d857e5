"""Attacks (fosctrain.attacks): agreement with torchattacks, compaction that changes the cost
but never the result, projection and trace invariants, model-state hygiene, stopping rules in
the engine (the rules themselves: test_stopping.py), the official code's quirks as options, and
option validation."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torchattacks
from torch import nn

from fosctrain.attacks import (
    ATTACKS,
    FGSM,
    FGSM_RS_ALPHA,
    PGD,
    PGDL2,
    AttackSpec,
    CWInf,
    FoscThreshold,
    MisclassifiedTau,
    create_attack,
    register,
    run_attack,
)
from fosctrain.attacks.engine import MIN_ROWS, _pad_rows, project
from fosctrain.errors import UserError
from fosctrain.fosc import fosc
from fosctrain.losses import input_gradient

EPS = 0.3


@pytest.fixture(scope="module")
def data(shared_cnn, shared_batch):
    """The shared batch labelled with the model's own clean predictions, so every sample
    starts correctly classified (FAT's rule and targeted attacks then mean something)."""
    x, _ = shared_batch
    with torch.no_grad():
        y = shared_cnn(x).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def plain_run(shared_cnn, data):
    """A 10-step PGD run without stopping, random start seed 0."""
    x, y = data
    return PGD(eps=EPS, alpha=0.01, steps=10, seed=0)(shared_cnn, x, y)


def expected_grad_evals(res, steps: int, n: int, compact: bool) -> int:
    """Rows evaluated per step from the result's steps/stopped: a sample stopped after k
    steps was evaluated at steps 0..k, one never stopped at 0..steps-1; a compacted step
    evaluates the running rows padded to min(MIN_ROWS, n), a full or uncompacted one n rows."""
    total = 0
    for k in range(steps):
        active = int(((res.stopped & (res.steps >= k)) | (~res.stopped & (k < steps))).sum())
        if active == 0:
            break
        total += n if (active == n or not compact) else max(active, min(MIN_ROWS, n))
    return total


class StopAt:
    """A test stopping rule: sample i stops at the first consulted step >= at[i]; records
    the steps at which it was consulted."""

    def __init__(self, at: torch.Tensor) -> None:
        self.at = at
        self.calls: list[int] = []

    def reset(self, batch_size, device) -> None:
        self.calls = []

    def __call__(self, step, idx, fosc, logits, y, targeted):
        self.calls.append(step)
        return step >= self.at[idx]


# ------------------------------------------------------------------ torchattacks agreement


@pytest.mark.parametrize("eps,alpha", [(0.3, 0.01), (8 / 255, 2 / 255)])
def test_pgd_matches_torchattacks(shared_cnn, data, eps, alpha):
    x, y = data
    ours = PGD(eps=eps, alpha=alpha, steps=10, random_start=False)(shared_cnn, x, y)
    ref = torchattacks.PGD(shared_cnn, eps=eps, alpha=alpha, steps=10, random_start=False)(x, y)
    torch.testing.assert_close(ours.x_adv, ref, rtol=0, atol=1e-6)
    assert (ours.x_adv - x).abs().max().item() == pytest.approx(min(eps, 10 * alpha), abs=1e-6)
    assert not shared_cnn.training


@pytest.mark.parametrize("eps", [0.3, 8 / 255])
def test_fgsm_matches_torchattacks(shared_cnn, data, eps):
    x, y = data
    ours = FGSM(eps=eps)(shared_cnn, x, y)
    ref = torchattacks.FGSM(shared_cnn, eps=eps)(x, y)
    torch.testing.assert_close(ours.x_adv, ref, rtol=0, atol=1e-6)
    assert ours.steps.tolist() == [1] * x.shape[0]
    assert ours.grad_evals == x.shape[0]
    # Not a no-op: most pixels moved by eps or hit the box.
    moved = (ours.x_adv - x).abs()
    assert ((moved - eps).abs() < 1e-6).float().mean() > 0.5


def test_cw_inf_margin_increases_over_steps(shared_cnn, data):
    x, y = data

    def margin(logits):  # max_{j != y} z_j - z_y, independent of the clamped objective
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        return logits.scatter(1, y[:, None], float("-inf")).amax(1) - z_y

    with torch.no_grad():
        margins = [margin(shared_cnn(x)).mean().item()]
        for steps in (1, 3, 10):
            attack = CWInf(eps=EPS, alpha=0.01, steps=steps, random_start=False)
            assert attack.loss == "cw"
            with torch.enable_grad():
                x_adv = attack(shared_cnn, x, y).x_adv
            margins.append(margin(shared_cnn(x_adv)).mean().item())
    assert margins == sorted(margins)
    assert margins[-1] > margins[0] + 0.1
    assert margins[0] < 0 < margins[-1]  # from correctly classified to misclassified


# ------------------------------------------------------------------------------ compaction


def _assert_same_result(a, b):
    assert torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(a.fosc.nan_to_num(-1.0), b.fosc.nan_to_num(-1.0))
    assert torch.equal(a.fosc_trace.nan_to_num(-1.0), b.fosc_trace.nan_to_num(-1.0))
    assert torch.equal(a.fosc_trace.isnan(), b.fosc_trace.isnan())
    assert torch.equal(a.steps, b.steps)
    assert torch.equal(a.stopped, b.stopped)


@pytest.mark.parametrize(
    "rule",
    ["fosc-q05", "fosc-q50", "fosc-q90", "fosc-q50-box-min1", "tau0", "tau1", "tau3"],
)
def test_compaction_is_bit_identical_and_cheaper(shared_cnn, data, plain_run, rule):
    x, y = data
    n, steps = x.shape[0], 5
    options: dict = {}
    if rule.startswith("fosc"):
        q = int(rule.split("-")[1][1:]) / 100
        step3 = plain_run.fosc_trace[3]
        if "box" in rule:
            options.update(fosc_box=True, min_steps=1)
            # Box FOSC is smaller; take its own step-3 quantile.
            step3 = PGD(eps=EPS, alpha=0.01, steps=4, seed=0, fosc_box=True)(
                shared_cnn, x, y
            ).fosc_trace[3]
        make_rule = lambda: FoscThreshold(torch.quantile(step3, q).item())  # noqa: E731
    else:
        tau = int(rule[3:])
        make_rule = lambda: MisclassifiedTau(tau)  # noqa: E731
    results = {
        compact: PGD(
            eps=EPS, alpha=0.01, steps=steps, seed=0, stop=make_rule(), compact=compact, **options
        )(shared_cnn, x, y)
        for compact in (True, False)
    }
    a, b = results[True], results[False]
    _assert_same_result(a, b)
    stopped = a.stopped.float().mean().item()
    assert stopped > 0.0  # the rule really stopped someone ...
    assert a.steps.float().mean() < steps  # ... early
    assert a.grad_evals < b.grad_evals
    assert a.grad_evals == expected_grad_evals(a, steps, n, compact=True)
    assert b.grad_evals == expected_grad_evals(b, steps, n, compact=False)


def test_compaction_thresholds_span_some_many_almost_all(shared_cnn, data, plain_run):
    """The quantile thresholds used above really give different stop fractions."""
    x, y = data
    fracs = []
    for q in (0.05, 0.5, 0.9):
        c = torch.quantile(plain_run.fosc_trace[3], q).item()
        res = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, stop=FoscThreshold(c))(shared_cnn, x, y)
        fracs.append(res.stopped.float().mean().item())
        assert (res.fosc[res.stopped] <= c).all()
        # Samples never stopped were above the threshold at every evaluated point.
        assert (res.fosc_trace[:, ~res.stopped] > c).all()
    assert fracs[0] < fracs[1] < fracs[2]
    assert 0.1 < fracs[0] < 0.5 < fracs[1] and fracs[2] >= 0.9


@pytest.mark.parametrize("random_start", [True, False])
def test_everyone_stops_at_step_zero(shared_cnn, data, random_start):
    x, y = data
    n = x.shape[0]
    start = PGD(eps=EPS, steps=1, seed=4, random_start=random_start, stop=FoscThreshold(1e9))
    res = start(shared_cnn, x, y)
    assert torch.equal(res.steps, torch.zeros(n, dtype=torch.long))
    assert res.stopped.all()
    assert res.grad_evals == n  # one full-batch evaluation, no padding
    expected_start = _reconstruct_start(x, EPS, 4) if random_start else x
    torch.testing.assert_close(res.x_adv, expected_start, rtol=0, atol=1e-6)
    assert res.fosc_trace.shape == (1, n)
    assert torch.equal(res.fosc, res.fosc_trace[0])
    # A longer budget changes nothing: the start point is returned.
    res10 = PGD(eps=EPS, steps=10, seed=4, random_start=random_start, stop=FoscThreshold(1e9))(
        shared_cnn, x, y
    )
    assert torch.equal(res10.x_adv, res.x_adv)
    assert res10.grad_evals == n
    assert res10.fosc_trace[1:].isnan().all()


def test_pad_rows_rule():
    idx = torch.tensor([3, 7, 9])
    padded = _pad_rows(idx, 64)
    assert padded.numel() == MIN_ROWS
    assert torch.equal(padded[:3], idx)
    assert (padded[3:] == 3).all()
    assert torch.equal(_pad_rows(idx, 5), torch.tensor([3, 7, 9, 3, 3]))  # min(MIN_ROWS, n)
    big = torch.arange(20)
    assert torch.equal(_pad_rows(big, 64), big)


def test_compaction_with_few_survivors_pads_and_stays_identical(shared_cnn, data):
    """Three samples keep running alone (padded to MIN_ROWS rows) for 8 steps."""
    x, y = data
    n = x.shape[0]
    at = torch.full((n,), 1)
    at[[5, 17, 60]] = 100
    a = PGD(eps=EPS, alpha=0.02, steps=10, seed=2, stop=StopAt(at))(shared_cnn, x, y)
    b = PGD(eps=EPS, alpha=0.02, steps=10, seed=2, stop=StopAt(at), compact=False)(shared_cnn, x, y)
    _assert_same_result(a, b)
    assert a.grad_evals == 2 * n + 8 * MIN_ROWS
    assert b.grad_evals == 10 * n
    assert a.steps[[5, 17, 60]].tolist() == [10, 10, 10]
    assert (a.steps.sum() - 30) == (n - 3) * 1


@pytest.mark.parametrize("random_start", [False, True])
def test_inputs_are_not_modified(shared_cnn, data, random_start):
    """x and y come back untouched, also along the in-place compacted update path."""
    x, y = data
    x_in, y_in = x.clone(), y.clone()
    at = torch.arange(x.shape[0]) % 3
    PGD(eps=EPS, alpha=0.05, steps=3, random_start=random_start, seed=0, stop=StopAt(at))(
        shared_cnn, x_in, y_in
    )
    assert torch.equal(x_in, x) and torch.equal(y_in, y)


# ---------------------------------------------------------------- projection and traces


def test_linf_projection_steps_and_trace(shared_cnn, data, plain_run):
    x, _ = data
    n = x.shape[0]
    res = plain_run
    delta = (res.x_adv - x).abs().flatten(1).amax(1)
    assert (delta <= EPS + 1e-6).all()
    assert delta.max().item() == pytest.approx(EPS, abs=1e-6)  # the constraint is active
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert (res.x_adv == 0).any() and (res.x_adv == 1).any()  # ... and so is the box
    assert res.steps.tolist() == [10] * n
    assert not res.stopped.any()
    assert res.grad_evals == 10 * n
    assert res.fosc_trace.shape == (10, n)
    assert torch.isfinite(res.fosc_trace).all()
    assert torch.equal(res.fosc, res.fosc_trace[-1])
    assert (res.fosc_trace >= -1e-5).all()


def test_l2_projection(shared_cnn, data):
    x, y = data
    eps = 2.0
    res = PGDL2(eps=eps, alpha=1.0, steps=5, seed=1)(shared_cnn, x, y)
    norms = (res.x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps * (1 + 1e-5)).all()
    assert norms.max().item() > 0.9 * eps  # the constraint matters
    # Without the pixel box the iterate would be on the sphere: check the L2 projection
    # itself with bounds that never bind.
    wide = run_attack(
        shared_cnn,
        x,
        y,
        AttackSpec(eps=eps, alpha=1.0, steps=3, norm="l2", bounds=(-10.0, 10.0)),
        generator=torch.Generator().manual_seed(1),
    )
    wide_norms = (wide.x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(wide_norms, torch.full_like(wide_norms, eps), rtol=1e-5, atol=0)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.fosc_trace.shape == (5, x.shape[0])
    assert (res.fosc_trace >= -1e-4).all()
    # The trace is the L2 FOSC: recompute it at the step-0 (random start) point.
    start = _reconstruct_start_l2(x, eps, 1)
    g0, _, _ = input_gradient(shared_cnn, start, y)
    torch.testing.assert_close(
        res.fosc_trace[0], fosc(start, x, g0, eps, "l2"), rtol=1e-4, atol=1e-4
    )


def test_trace_nan_after_stop_and_finite_before(shared_cnn, data, plain_run):
    x, y = data
    c = torch.quantile(plain_run.fosc_trace[3], 0.2).item()
    res = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, stop=FoscThreshold(c))(shared_cnn, x, y)
    finite = torch.isfinite(res.fosc_trace)
    evaluated = res.steps + res.stopped.long()  # points whose gradient was evaluated
    rows = torch.arange(5)[:, None]
    assert torch.equal(finite, rows < evaluated[None, :])
    last = res.fosc_trace.gather(0, (evaluated - 1)[None, :])[0]
    assert torch.equal(res.fosc, last)
    assert res.stopped.any() and (~res.stopped).any()


@pytest.mark.parametrize("fosc_box", [False, True])
def test_final_fosc_is_fosc_at_x_adv(shared_cnn, data, fosc_box):
    x, y = data
    n = x.shape[0]
    base = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, fosc_box=fosc_box)(shared_cnn, x, y)
    res = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, fosc_box=fosc_box, final_fosc=True)(
        shared_cnn, x, y
    )
    assert res.fosc_trace.shape == (6, n)
    assert torch.equal(res.fosc_trace[:5], base.fosc_trace)
    assert torch.equal(res.x_adv, base.x_adv)
    assert res.grad_evals == 6 * n
    grad, _, _ = input_gradient(shared_cnn, res.x_adv, y)
    expected = fosc(res.x_adv, x, grad, EPS, "linf", (0.0, 1.0) if fosc_box else None)
    torch.testing.assert_close(res.fosc, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.fosc, res.fosc_trace[5])
    assert not torch.allclose(res.fosc, base.fosc)


def test_final_fosc_with_stopping_only_evaluates_the_runners(shared_cnn, data):
    x, y = data
    n = x.shape[0]
    at = torch.full((n,), 100)
    at[: n // 2] = 2
    res = PGD(eps=EPS, alpha=0.01, steps=4, seed=0, stop=StopAt(at), final_fosc=True)(
        shared_cnn, x, y
    )
    assert res.grad_evals == 3 * n + 2 * (n // 2)  # steps 0-2 full, step 3 + final: half
    assert res.fosc_trace[3:, : n // 2].isnan().all()
    assert torch.isfinite(res.fosc_trace[:, n // 2 :]).all()
    grad, _, _ = input_gradient(shared_cnn, res.x_adv, y)
    expected = fosc(res.x_adv, x, grad, EPS)
    torch.testing.assert_close(res.fosc, expected, rtol=1e-5, atol=1e-6)


def test_random_start_reproducible_with_seed_and_differs_across_seeds(shared_cnn, data):
    x, y = data
    attack = PGD(eps=EPS, alpha=0.01, steps=2, seed=11)
    a, b = attack(shared_cnn, x, y), attack(shared_cnn, x, y)
    assert torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(a.fosc_trace, b.fosc_trace)
    c = PGD(eps=EPS, alpha=0.01, steps=2)(
        shared_cnn, x, y, generator=torch.Generator().manual_seed(11)
    )
    assert torch.equal(a.x_adv, c.x_adv)
    d = PGD(eps=EPS, alpha=0.01, steps=2, seed=12)(shared_cnn, x, y)
    assert (a.x_adv != d.x_adv).float().mean() > 0.5
    no_start = PGD(eps=EPS, alpha=0.01, steps=2, random_start=False)(shared_cnn, x, y)
    assert not torch.equal(a.x_adv, no_start.x_adv)


def test_fosc_decreases_over_pgd_steps(shared_cnn, data):
    """The paper's finding: with a random start FOSC is large after the first step and
    falls as PGD runs."""
    x, y = data
    res = PGD(eps=EPS, alpha=0.01, steps=20, seed=0)(shared_cnn, x, y)
    mean = res.fosc_trace.mean(1)
    assert mean[-1] < 0.8 * mean[0]
    assert (mean[1:] < mean[:-1]).float().mean() >= 0.8
    # And per sample, most samples end lower than they started.
    assert (res.fosc_trace[-1] < res.fosc_trace[0]).float().mean() >= 0.8


def test_targeted_pgd_raises_fraction_predicted_as_target(shared_cnn, data):
    x, y = data
    target = (y + 3) % 10
    with torch.no_grad():
        before = (shared_cnn(x).argmax(1) == target).float().mean().item()
    res = PGD(eps=EPS, alpha=0.02, steps=15, seed=0, targeted=True)(shared_cnn, x, target)
    with torch.no_grad():
        after = (shared_cnn(res.x_adv).argmax(1) == target).float().mean().item()
    assert before == 0.0
    assert after >= 0.5
    # FAT's rule with targeted=True stops once the target is reached.
    stop = PGD(eps=EPS, alpha=0.02, steps=15, seed=0, targeted=True, stop=MisclassifiedTau(0))(
        shared_cnn, x, target
    )
    with torch.no_grad():
        pred = shared_cnn(stop.x_adv).argmax(1)
    assert (pred[stop.stopped] == target[stop.stopped]).all()
    assert stop.stopped.float().mean() >= 0.5


# ------------------------------------------------------------------------------ model state


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("training", [True, False])
def test_attack_restores_model_state(cnn, batch, training):
    x, y = batch
    x, y = x[:16], y[:16]
    cnn.train(training)
    params = list(cnn.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 0)  # mixed flags
    flags = [p.requires_grad for p in params]
    before = _snapshot(cnn)
    modes = [m.training for m in cnn.modules()]
    PGD(eps=EPS, alpha=0.05, steps=3, seed=0)(cnn, x, y)
    assert cnn.training is training
    assert [m.training for m in cnn.modules()] == modes
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    after = _snapshot(cnn)
    for k in before:
        assert torch.equal(before[k], after[k]), k  # BN running stats and counters too


class RaisesOnCall(nn.Module):
    def __init__(self, inner: nn.Module, bad_call: int) -> None:
        super().__init__()
        self.inner = inner
        self.bad_call = bad_call
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x):
        self.calls += 1
        self.modes.append(self.inner.training)
        if self.calls == self.bad_call:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("training", [True, False])
def test_attack_restores_state_when_model_raises(cnn, batch, training):
    x, y = batch
    model = RaisesOnCall(cnn, bad_call=3).train(training)
    cnn.train(training)
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in params]
    before = _snapshot(cnn)
    with pytest.raises(RuntimeError, match="boom"):
        PGD(eps=EPS, steps=5, seed=0)(model, x[:16], y[:16])
    assert model.calls == 3
    assert model.modes == [False, False, False]  # the attack itself ran in eval mode
    assert model.training is training and cnn.training is training
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    after = _snapshot(cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_attack_on_linear_model_with_existing_grads(linear_model):
    """Parameter .grad tensors that already exist are left untouched (not accumulated)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 4, 4, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    linear_model(x).sum().backward()
    grads = [p.grad.clone() for p in linear_model.parameters()]
    res = PGD(eps=0.1, alpha=0.05, steps=3, random_start=False)(linear_model, x, y)
    assert all(
        torch.equal(p.grad, g) for p, g in zip(linear_model.parameters(), grads, strict=True)
    )
    assert all(p.requires_grad for p in linear_model.parameters())
    assert ((res.x_adv - x).abs() <= 0.1 + 1e-6).all()


def test_linear_loss_reaches_the_vertex_where_box_fosc_is_zero():
    """A 2-class linear model under the C&W margin has the constant input gradient
    w_other - w_y: PGD walks to the clipped vertex x0 + eps sign(g), a KKT point of the real
    threat set, where the box FOSC is exactly 0 and the paper form is not (clipped pixels)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 4, 4, generator=gen)
    x[:, 0, 0] = 1.0  # saturated pixels, so clipping happens
    x[:, 0, 1] = 0.0
    y = torch.randint(0, 2, (8,), generator=gen)
    eps = 0.1
    res = CWInf(eps=eps, alpha=0.05, steps=3, random_start=False, fosc_box=True, final_fosc=True)(
        model, x, y
    )
    w = model[1].weight.detach()
    g = (w[1 - y] - w[y]).view(8, 1, 4, 4)
    vertex = torch.clamp(x + eps * g.sign(), 0, 1)
    torch.testing.assert_close(res.x_adv, vertex, rtol=0, atol=1e-7)
    assert res.fosc.abs().max().item() <= 1e-6
    assert res.fosc_trace[0].min() > 0.01  # it was far from stationary at x0
    paper = fosc(res.x_adv, x, g, eps)
    assert paper.min() > 1e-3


# --------------------------------------------------------------------------- stopping rules


def test_min_steps_one_skips_the_rule_at_step_zero(shared_cnn, data):
    x, y = data
    n = x.shape[0]
    spy = StopAt(torch.zeros(n, dtype=torch.long))
    res = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, stop=spy, min_steps=1)(shared_cnn, x, y)
    assert spy.calls == [1]
    assert res.steps.tolist() == [1] * n
    assert res.stopped.all()
    assert res.grad_evals == 2 * n
    res0 = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, stop=FoscThreshold(1e9))(shared_cnn, x, y)
    res1 = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, stop=FoscThreshold(1e9), min_steps=1)(
        shared_cnn, x, y
    )
    assert res0.steps.tolist() == [0] * n
    assert res1.steps.tolist() == [1] * n
    one_step = PGD(eps=EPS, alpha=0.01, steps=1, seed=0)(shared_cnn, x, y)
    assert torch.equal(res1.x_adv, one_step.x_adv)


# ------------------------------------------------------------------------ fosc_from_start


def _reconstruct_start(x0, eps, seed):
    """The L-inf random start, rebuilt from the seed: uniform noise in the ball drawn on the
    CPU, clipped into the pixel box."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(x0.shape, generator=gen) * 2 - 1
    return torch.clamp(x0 + noise * eps, 0, 1)


def _reconstruct_start_l2(x0, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(x0.shape, generator=gen)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = torch.rand((x0.shape[0],), generator=gen) * eps
    return torch.clamp(x0 + direction * radius.view(-1, 1, 1, 1), 0, 1)


def test_fosc_from_start_measures_around_the_random_start(shared_cnn, data):
    x, y = data
    start = _reconstruct_start(x, EPS, 9)
    g0, _, _ = input_gradient(shared_cnn, start, y)
    quirk = PGD(eps=EPS, alpha=0.01, steps=3, seed=9, fosc_from_start=True, final_fosc=True)(
        shared_cnn, x, y
    )
    right = PGD(eps=EPS, alpha=0.01, steps=3, seed=9, final_fosc=True)(shared_cnn, x, y)
    assert torch.equal(quirk.x_adv, right.x_adv)  # only the measurement differs
    # At the start itself the quirk's FOSC is eps * ||g||_1 (x - centre = 0) ...
    torch.testing.assert_close(
        quirk.fosc_trace[0], EPS * g0.flatten(1).abs().sum(1), rtol=1e-4, atol=1e-5
    )
    # ... the correct one subtracts the progress already made from x0.
    torch.testing.assert_close(right.fosc_trace[0], fosc(start, x, g0, EPS), rtol=1e-4, atol=1e-4)
    progress = ((start - x).flatten(1) * g0.flatten(1)).sum(1)
    torch.testing.assert_close(
        quirk.fosc_trace[0] - right.fosc_trace[0], progress, rtol=1e-3, atol=1e-4
    )
    assert progress.abs().median() > 2e-3  # the two measurements really differ
    # At the end: fosc() with x0 replaced by the start point.
    g, _, _ = input_gradient(shared_cnn, quirk.x_adv, y)
    torch.testing.assert_close(quirk.fosc, fosc(quirk.x_adv, start, g, EPS), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(right.fosc, fosc(right.x_adv, x, g, EPS), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=-0.1), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=float("inf")), "eps"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(alpha=0.0), "step size"),
        (dict(alpha=-1.0), "step size"),
        (dict(alpha=float("nan")), "step size"),
        (dict(loss="hinge"), "loss"),
    ],
)
def test_invalid_options_raise_user_error(linear_model, options, match):
    x = torch.rand(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match=match):
        PGD(**options)(linear_model, x, y)
    assert all(p.requires_grad for p in linear_model.parameters())
    assert not linear_model.training


def test_unknown_norm_raises_user_error(linear_model):
    x = torch.rand(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="norm"):
        run_attack(linear_model, x, y, AttackSpec(eps=0.1, alpha=0.01, steps=1, norm="l1"))


# ---------------------------------------------------------------------------------- factory

SRC = Path(__file__).resolve().parents[1] / "src" / "fosctrain"


def test_create_attack_builds_every_registered_attack_with_the_same_options(linear_model):
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    options = dict(eps=0.1, alpha=0.02, steps=1, random_start=False, final_fosc=True, seed=0)
    assert sorted(ATTACKS) == ["apgd", "apgd-l2", "cw", "fgsm", "fgsm-rs", "pgd", "pgd-l2"]
    for name, cls in ATTACKS.items():
        attack = create_attack(name, **options)
        assert type(attack) is cls and attack.step_size == 0.02 and attack.steps == 1
        assert attack.norm == cls.norm and attack.final_fosc and not attack.random_start
        res = attack(linear_model, x, y)
        assert res.steps.tolist() == [1] * 4 and res.grad_evals == 8  # a step and final_fosc
        p = math.inf if cls.norm == "linf" else 2
        assert (res.x_adv - x).flatten(1).norm(dim=1, p=p).max() <= 0.1 + 1e-6


def test_create_attack_picks_the_form_of_the_norm():
    assert type(create_attack("pgd", norm="linf")) is PGD
    assert type(create_attack("pgd", norm="l2")) is PGDL2
    assert type(create_attack("pgd-l2", norm="l2")) is PGDL2
    assert type(create_attack("pgd-l2")) is PGDL2 and type(create_attack("cw")) is CWInf
    assert create_attack("pgd", norm="l2", eps=1.5, steps=3).norm == "l2"
    for name, norm in (("cw", "l2"), ("fgsm", "l2"), ("fgsm-rs", "l2"), ("pgd-l2", "linf")):
        choices = (
            "['apgd', 'apgd-l2', 'pgd', 'pgd-l2']"
            if norm == "l2"
            else "['apgd', 'cw', 'fgsm', 'fgsm-rs', 'pgd']"
        )
        message = f"attack '{name}' has no {norm} form; for {norm} choose one of {choices}"
        with pytest.raises(UserError, match=re.escape(message)):
            create_attack(name, norm=norm)
    with pytest.raises(UserError, match="unknown norm 'l1'"):
        create_attack("pgd", norm="l1")


def test_unknown_attack_names_give_a_user_error_listing_the_choices():
    choices = "['apgd', 'apgd-l2', 'cw', 'fgsm', 'fgsm-rs', 'pgd', 'pgd-l2']"
    for name, norm in (("deepfool", None), ("deepfool", "l2"), ("PGD", "linf")):
        message = f"unknown attack {name!r}; choose one of {choices}"
        with pytest.raises(UserError, match=re.escape(message)):
            create_attack(name, norm=norm, eps=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register("pgd")(PGD)
    assert ATTACKS["pgd"] is PGD


@pytest.mark.parametrize(
    ("name", "expected", "rule"),
    [
        ("pgd", 0.2 / 4, "eps/4"),
        ("pgd-l2", 0.2 / 4, "eps/4"),
        ("cw", 0.2 / 4, "eps/4"),
        ("fgsm", 0.2, "eps"),
        ("fgsm-rs", FGSM_RS_ALPHA * 0.2, "1.25 eps"),
        ("apgd", 0.4, "2 eps, halved at APGD's checkpoints"),
        ("apgd-l2", 0.4, "2 eps, halved at APGD's checkpoints"),
    ],
)
def test_each_attack_class_owns_its_step_size_rule(name, expected, rule):
    attack = create_attack(name, eps=0.2)
    assert attack.alpha is None and attack.alpha_rule == rule
    assert attack.step_size == attack.default_alpha() == pytest.approx(expected)
    assert attack.step_size == attack.describe()["alpha"]
    assert create_attack(name, eps=0.2, alpha=0.01).step_size == 0.01
    assert FGSM_RS_ALPHA == 1.25


def test_every_attack_is_the_spec_the_engine_runs(linear_model):
    """An attack passes itself to run_attack: the options are AttackSpec's fields (with the
    class's defaults and seed), its norm and the engine's pixel box are the class's, and a plain
    AttackSpec of the same settings gives the same result."""
    engine_only = {"norm", "bounds", "eval_mode"}
    options = {f.name for f in dataclasses.fields(AttackSpec)} - engine_only
    for cls in ATTACKS.values():
        assert issubclass(cls, AttackSpec)
        assert {f.name for f in dataclasses.fields(cls) if f.init} == options | {"seed"}
        with pytest.raises(TypeError):
            cls(norm="l2" if cls.norm == "linf" else "linf")
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(UserError, match="give alpha"):
        run_attack(linear_model, x, y, AttackSpec(eps=0.1, alpha=None, steps=1))
    attack = create_attack("pgd", norm="l2", eps=1.0, steps=3, loss="cw", min_steps=1)
    spec = AttackSpec(eps=1.0, alpha=0.25, steps=3, loss="cw", min_steps=1, norm="l2")
    ours = attack(linear_model, x, y, generator=torch.Generator().manual_seed(2))
    plain = run_attack(linear_model, x, y, spec, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours.x_adv, plain.x_adv) and torch.equal(ours.fosc, plain.fosc)


def _src_modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC), ast.parse(path.read_text())


def test_attacks_are_built_only_inside_the_attacks_package():
    """Everyone else builds them with create_attack: the name and norm -> class choice and each
    class's step-size rule live in the registry and the classes."""
    names = {cls.__name__ for cls in ATTACKS.values()} | {"AttackSpec"}
    found = []
    for module, tree in _src_modules():
        if module.parts[0] == "attacks":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            peer = isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "ta"
            if called in names and not peer:  # torchattacks' own APGD is not ours
                found.append(f"{module}:{node.lineno} {called}(...)")
    assert found == []


def test_nothing_sets_an_attacks_options_after_construction():
    """An attack is built with the options it runs with: no `X.alpha = ...` anywhere (nor of
    another option on anything but `self`), no setattr of one."""
    options = {f.name for f in dataclasses.fields(PGD) if f.init}
    found = []
    for module, tree in _src_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and name.value in options:
                    found.append(f"{module}:{node.lineno} setattr(..., {name.value!r})")
                continue
            else:
                continue
            for target in targets:
                for sub in ast.walk(target):
                    if not isinstance(sub, ast.Attribute) or sub.attr not in options:
                        continue
                    on_self = isinstance(sub.value, ast.Name) and sub.value.id == "self"
                    if sub.attr == "alpha" or not on_self:
                        found.append(f"{module}:{node.lineno} .{sub.attr} = ...")
    assert found == []


# ---------------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_model_device(data):
    from conftest import paper_mnist_cnn

    x, y = data
    model = paper_mnist_cnn().cuda()
    res = PGD(eps=EPS, alpha=0.01, steps=5, seed=0, stop=FoscThreshold(0.4))(
        model, x.cuda(), y.cuda()
    )
    for t in (res.x_adv, res.fosc, res.fosc_trace, res.steps, res.stopped):
        assert t.device.type == "cuda"
    assert ((res.x_adv.cpu() - x).abs() <= EPS + 1e-6).all()
    # Same random start as on the CPU (drawn on the CPU from the seed).
    first = PGD(eps=EPS, steps=1, seed=0, stop=FoscThreshold(1e9))(model, x.cuda(), y.cuda())
    torch.testing.assert_close(first.x_adv.cpu(), _reconstruct_start(x, EPS, 0), atol=1e-6, rtol=0)


def test_runs_on_cpu_tensors_by_default(shared_cnn, data):
    x, y = data
    res = PGD(eps=EPS, steps=1, seed=0)(shared_cnn, x[:4], y[:4])
    assert res.x_adv.device == x.device and res.fosc.device == x.device
    assert math.isfinite(res.fosc.sum().item())


def test_numpy_scalars_are_accepted_and_booleans_refused(linear_model):
    import numpy as np

    x = torch.rand(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    res = PGD(eps=np.float32(0.1), alpha=np.float64(0.02), steps=np.int64(2), seed=0)(
        linear_model, x, y
    )
    assert res.steps.tolist() == [2, 2, 2, 2]
    assert (res.x_adv - x).abs().max() <= 0.1 + 1e-6
    for bad in (dict(eps=True), dict(steps=True)):
        with pytest.raises(UserError):
            PGD(**{"eps": 0.1, "steps": 2, **bad})(linear_model, x, y)
    with pytest.raises(UserError, match="box-exact"):
        PGDL2(eps=0.5, steps=1, fosc_box=True)(linear_model, x, y)


# ------------------------------------------------------------ start sampler and step observer


def test_a_custom_sampler_is_where_the_attack_starts(shared_cnn, data):
    """The sampler's point (projected onto the threat set) is the start: x_start equals it and
    an attack whose rule stops everyone at once returns it."""
    x, y = data
    calls = []

    def corner(x0, eps, norm, generator):
        calls.append((x0.shape, eps, norm, generator))
        return x0 + eps * torch.where(torch.arange(x0[0].numel()) % 2 == 0, 1.0, -1.0).view(
            x0.shape[1:]
        )

    gen = torch.Generator().manual_seed(0)
    expected = project(corner(x, EPS, "linf", None), x, EPS, "linf", (0.0, 1.0))
    calls.clear()
    res = PGD(eps=EPS, steps=3, stop=FoscThreshold(1e9))(
        shared_cnn, x, y, generator=gen, start=corner
    )
    assert calls == [(x.shape, EPS, "linf", gen)]
    assert torch.equal(res.x_start, expected)
    assert torch.equal(res.x_adv, expected)
    moved = PGD(eps=EPS, alpha=0.01, steps=3)(shared_cnn, x, y, generator=gen, start=corner)
    assert torch.equal(moved.x_start, expected)
    assert not torch.equal(moved.x_adv, expected)
    # The default sampler is the uniform one; without a random start the start is x itself.
    uniform = PGD(eps=EPS, steps=1, seed=4)(shared_cnn, x, y)
    torch.testing.assert_close(uniform.x_start, _reconstruct_start(x, EPS, 4), rtol=0, atol=1e-6)
    assert torch.equal(PGD(eps=EPS, steps=1, random_start=False)(shared_cnn, x, y).x_start, x)


@pytest.mark.parametrize("compact", [True, False])
def test_the_observer_sees_every_step_of_the_active_set(shared_cnn, data, compact):
    """One call per evaluated point (final evaluation included) with the running samples'
    indices; its FOSC is fosc_trace's, its loss the objective at its logits."""
    x, y = data
    n = x.shape[0]
    at = torch.arange(n) % 8  # sample i stops at step i mod 8 (6 and 7: never)
    seen = []

    def observe(step, idx, logits, loss, f):
        seen.append((step, idx.clone(), logits.clone(), loss.clone(), f.clone()))

    steps = 6
    res = PGD(eps=EPS, alpha=0.01, steps=steps, seed=1, stop=StopAt(at), final_fosc=True,
              compact=compact)(shared_cnn, x, y, observer=observe)  # fmt: skip
    assert [s[0] for s in seen] == list(range(steps + 1))
    for step, idx, logits, loss, f in seen:
        running = (~res.fosc_trace[step].isnan()).nonzero().squeeze(1)
        assert torch.equal(idx, running)
        assert torch.equal(idx, (at >= step).nonzero().squeeze(1))
        assert torch.equal(f, res.fosc_trace[step, idx])
        torch.testing.assert_close(
            loss, torch.nn.functional.cross_entropy(logits, y[idx], reduction="none")
        )
    assert torch.equal(seen[-1][4], res.fosc[seen[-1][1]])


def test_no_module_assigns_into_another_modules_attributes():
    """Hooks are explicit arguments (e.g. the data-parallel start sampler), never a module's
    attribute swapped from outside: no `module.name = ...` anywhere in the package."""
    import ast
    import importlib
    import pathlib
    import types

    import fosctrain

    offenders = []
    for path in pathlib.Path(fosctrain.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    try:
                        obj = getattr(importlib.import_module(node.module), a.name, None)
                    except ImportError:
                        obj = None
                    if isinstance(obj, types.ModuleType):
                        modules.add(a.asname or a.name)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                name = getattr(t.value, "id", None) if isinstance(t, ast.Attribute) else None
                if name in modules:
                    offenders.append(f"{path.name}:{t.lineno} {ast.unparse(t)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr":
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Name) and arg.id in modules:
                    offenders.append(f"{path.name}:{node.lineno} setattr({arg.id}, ...)")
    assert offenders == []
