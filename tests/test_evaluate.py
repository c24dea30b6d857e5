"""Tests of fosctrain.evaluate: intervals, the worst case, FOSC probes, reports, and each
gradient-masking check triggered by a model built to trip it (and none by a sound model)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from torch import nn

from fosctrain.attacks import PGD
from fosctrain.attacks.engine import AttackSpec, run_attack
from fosctrain.errors import UserError
from fosctrain.evaluate import (
    EvalReport,
    evaluate,
    format_table,
    point_fosc,
    write_report,
)

SIDE = 8
N = 64
EPS = 0.02


class Linear2(nn.Module):
    """Binary linear classifier on images: logits (0, s * w . (x - 0.5)). PGD's sign steps
    reach the optimal vertex, so every attack agrees: the well-behaved reference."""

    def __init__(self, seed: int, scale: float = 3.0) -> None:
        super().__init__()
        w = torch.randn(SIDE * SIDE, generator=torch.Generator().manual_seed(seed))
        self.w = nn.Parameter(w * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) - 0.5) @ self.w
        return torch.stack([torch.zeros_like(z), z], 1)


class Quantized(nn.Module):
    """`inner` behind 8-bit input rounding: gradients are exactly zero, so PGD cannot move
    (classic gradient masking); the decision is almost that of `inner`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 255) / 255)


class Landscape(nn.Module):
    """Binary model of u = mean(x - 0.5) / eps only: logits (0, f(u)); label 0 is correct
    while f(u) < 0. Inputs are constant 0.5 images, so u = 0 at the clean point."""

    def __init__(self, f, eps: float) -> None:
        super().__init__()
        self.f, self.eps = f, eps
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.flatten(1).mean(1) - 0.5) / self.eps
        z = self.f(u) + 0 * self.dummy
        return torch.stack([torch.zeros_like(z), z], 1)


def bump(u: torch.Tensor) -> torch.Tensor:
    """A local maximum at u = 0.3 that small steps cannot leave; misclassified only past
    u = 0.9. FGSM jumps from u = 0 to u = 1; PGD climbs into the bump and stays."""
    return -2 + 1.5 * torch.exp(-(((u - 0.3) / 0.1) ** 2)) + 40 * torch.relu(u - 0.9)


def fork(u: torch.Tensor) -> torch.Tensor:
    """Uphill to misclassification for u > 0, to a safe corner for u < 0: each random start
    succeeds with probability 1/2, so one more restart lowers accuracy a lot."""
    return -2 + 1.5 * torch.relu(-u) + 4 * torch.relu(u)


def spike(u: torch.Tensor) -> torch.Tensor:
    """A sharp interior maximum at u = 0.3: PGD with a fixed step oscillates around it."""
    return -1 - ((u - 0.3) / 0.05) ** 2


def linear_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0.3, 0.7] labelled by Linear2(0), so its clean accuracy is 100%."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(N, 1, SIDE, SIDE, generator=gen)
    with torch.no_grad():
        y = Linear2(0)(x).argmax(1)
    return x, y


def grey_data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((N, 1, SIDE, SIDE), 0.5), torch.zeros(N, dtype=torch.long)


def run_eval(model, x, y, eps=EPS, **kw) -> EvalReport:
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 32)
    kw.setdefault("autoattack", None)  # two-class toy models: APGD-T needs four classes
    return evaluate(model, x, y, eps_list=[eps], **kw)


def has_warning(report: EvalReport, text: str) -> bool:
    return any(text in w for w in report.warnings)


# ---------------------------------------------------------------- statistics


# ---------------------------------------------------------------- the checks


def test_well_behaved_model_triggers_no_check():
    x, y = linear_data()
    report = run_eval(Linear2(0), x, y, source_model=Linear2(7))
    assert report.warnings == []
    res = report.results[0]
    assert res.clean.acc == 1.0
    assert 0.0 < res.attacks["pgd"].acc < 1.0
    assert res.attacks["fgsm"].correct == res.attacks["pgd"].correct
    assert res.attacks["transfer"].acc >= res.attacks["pgd"].acc
    assert res.fosc["relative_mean"] < 0.05
    assert report.checks["large_eps_acc"] <= 0.1
    assert "no sign of gradient masking" in format_table(report)


def test_fgsm_stronger_than_pgd_is_flagged():
    x, y = grey_data()
    report = run_eval(Landscape(bump, 0.1), x, y, eps=0.1, attacks=("fgsm", "pgd"))
    res = report.results[0]
    assert res.attacks["fgsm"].acc == 0.0 and res.attacks["pgd"].acc == 1.0
    assert res.worst_case.acc == 0.0
    assert has_warning(report, "FGSM accuracy 0.0% is below PGD-20 accuracy 100.0%")


def test_stronger_pgd_lowering_accuracy_is_flagged():
    x, y = grey_data()
    report = run_eval(Landscape(fork, 0.1), x, y, eps=0.1, attacks=("pgd",))
    res = report.results[0]
    assert 0.3 < res.attacks["pgd"].acc < 0.7
    checks = res.checks
    assert checks["stronger_steps"] == 40 and checks["stronger_restarts"] == 2
    assert checks["pgd_acc_subset"] - checks["stronger_acc_subset"] > 0.1
    assert has_warning(report, "a stronger PGD (40 steps, 2 restarts) lowers accuracy")


def test_restarts_are_anded_into_pgd_and_worst_case():
    x, y = grey_data()
    one = run_eval(Landscape(fork, 0.1), x, y, eps=0.1, attacks=("pgd",), checks=False)
    three = run_eval(
        Landscape(fork, 0.1), x, y, eps=0.1, attacks=("pgd",), pgd_restarts=3, checks=False
    )
    assert three.results[0].attacks["pgd"].acc < one.results[0].attacks["pgd"].acc
    assert three.results[0].worst_case.correct == three.results[0].attacks["pgd"].correct
    assert three.results[0].settings["pgd"]["restarts"] == 3


def test_large_eps_accuracy_is_flagged():
    x, y = linear_data()
    report = run_eval(Quantized(Linear2(0)), x, y, attacks=("pgd",))
    assert report.checks["large_eps"] == 0.5
    assert report.checks["large_eps_acc"] > 0.1
    assert has_warning(report, "(large budget check): PGD-20 accuracy")


def test_transfer_stronger_than_white_box_is_flagged():
    x, y = linear_data()
    report = run_eval(Quantized(Linear2(0)), x, y, attacks=("pgd",), source_model=Linear2(0))
    res = report.results[0]
    assert res.attacks["transfer"].acc < res.attacks["pgd"].acc - 0.2
    assert res.worst_case.correct <= res.attacks["transfer"].correct
    assert has_warning(report, "the transfer attack (PGD crafted on the source model)")


def test_zero_gradients_are_flagged():
    x, y = linear_data()
    report = run_eval(Quantized(Linear2(0)), x, y, attacks=("pgd",), checks=True)
    assert report.results[0].fosc["zero_grad_frac"] == 1.0
    assert has_warning(report, "the input gradient is exactly zero")


def test_unconverged_fosc_is_flagged():
    x, y = grey_data()
    report = run_eval(Landscape(spike, 0.1), x, y, eps=0.1, attacks=("pgd",))
    fosc = report.results[0].fosc
    assert fosc["ratio"] > 0.5 and fosc["relative_ratio"] > 0.5
    assert has_warning(report, "PGD has not converged")
    assert not has_warning(report, "stronger PGD")


def test_checks_can_be_switched_off():
    x, y = grey_data()
    report = run_eval(Landscape(bump, 0.1), x, y, eps=0.1, checks=False)
    assert report.warnings == [] and report.checks == {}
    assert report.results[0].checks == {}


# ---------------------------------------------------------------- FOSC probes


def test_point_fosc_matches_the_engine_at_start_and_end():
    x, y = linear_data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 3))
    attack = PGD(eps=0.1, alpha=0.02, steps=5, fosc_box=True, final_fosc=True)
    gen = torch.Generator().manual_seed(3)
    res = attack(model, x, y, generator=gen)
    f0, r0 = point_fosc(model, x, res.x_start, y, 0.1)
    f1, r1 = point_fosc(model, x, res.x_adv, y, 0.1)
    torch.testing.assert_close(f0, res.fosc_trace[0])
    torch.testing.assert_close(f1, res.fosc)
    assert bool(((r0 >= 0) & (r0 <= 1)).all()) and bool(((r1 >= 0) & (r1 <= 1)).all())
    assert 0.3 < r0.mean().item() < 0.7


def test_point_fosc_paper_form_matches_run_attack():
    x, y = linear_data()
    model = Linear2(0)
    res = run_attack(model, x, y, AttackSpec(eps=0.05, alpha=0.01, steps=3, final_fosc=True))
    f, rel = point_fosc(model, x, res.x_adv, y, 0.05, fosc_box=False)
    torch.testing.assert_close(f, res.fosc)
    assert bool((rel <= 1 + 1e-6).all())


# ---------------------------------------------------------------- API behaviour


def test_report_settings_and_round_trip(tmp_path):
    x, y = linear_data()
    report = run_eval(Linear2(0), x[:40], y[:40], eps=EPS, check_n=16)
    d = report.to_dict()
    json.dumps(d)
    assert d["n"] == 40 and d["settings"]["pgd_steps"] == 20
    res = d["results"][0]
    assert res["settings"]["pgd"]["alpha"] == pytest.approx(2.5 * EPS / 20)
    assert res["settings"]["fgsm"]["alpha"] == pytest.approx(EPS)
    assert res["settings"]["cw"]["steps"] == 30 and res["settings"]["cw"]["loss"] == "cw"
    assert res["checks"]["stronger_n"] == 16
    for key in ("acc", "ci_low", "ci_high", "correct", "n"):
        assert key in res["attacks"]["pgd"]
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["eval.json", "eval.csv"]
    assert json.loads(paths[0].read_text())["n"] == 40
    with paths[1].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["attack"] for r in rows] == ["clean", "fgsm", "pgd", "cw", "worst_case"]
    assert all(float(r["ci_low"]) <= float(r["acc"]) <= float(r["ci_high"]) for r in rows)
    assert {r["n"] for r in rows} == {"40"}


def test_several_eps_give_monotone_accuracy():
    x, y = linear_data()
    report = evaluate(
        Linear2(0),
        x,
        y,
        eps_list=[0.005, 0.01, 0.02],
        attacks=("pgd",),
        autoattack=None,
        checks=False,
        progress=False,
    )
    accs = [r.attacks["pgd"].acc for r in report.results]
    assert accs == sorted(accs, reverse=True)
    table = format_table(report)
    assert table.count("worst_case") == 3 and "95% CI" in table


def test_model_mode_and_grad_flags_are_restored():
    x, y = linear_data()
    model = Linear2(0)
    model.train()
    run_eval(model, x[:8], y[:8], attacks=("fgsm",), checks=False)
    assert model.training and model.w.requires_grad


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_eps_is_a_user_error(eps):
    x, y = linear_data()
    with pytest.raises(UserError, match="eps"):
        run_eval(Linear2(0), x, y, eps=eps)


def test_bad_options_are_user_errors():
    x, y = linear_data()
    with pytest.raises(UserError, match="unknown attack 'deepfool'"):
        run_eval(Linear2(0), x, y, attacks=("pgd", "deepfool"))
    with pytest.raises(UserError, match="pgd_steps"):
        run_eval(Linear2(0), x, y, pgd_steps=0)
    with pytest.raises(UserError, match="norm"):
        run_eval(Linear2(0), x, y, norm="l1")
    with pytest.raises(UserError, match="fgsm"):
        run_eval(Linear2(0), x, y, norm="l2", attacks=("fgsm",))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        run_eval(Linear2(0), x * 3, y)


def test_l2_evaluation_runs():
    x, y = linear_data()
    report = run_eval(Linear2(0), x, y, eps=0.5, norm="l2", attacks=("pgd",))
    assert report.results[0].settings["pgd"]["name"] == "PGDL2"
    assert report.checks["large_eps"] == 2.0


def test_autoattack_without_torchattacks_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    x, y = linear_data()
    with pytest.raises(UserError, match="pip install --no-deps torchattacks"):
        run_eval(Linear2(0), x, y, autoattack=True)


def test_autoattack_needs_four_classes():
    pytest.importorskip("torchattacks")
    x, y = linear_data()
    with pytest.raises(UserError, match="at least 4 classes"):
        run_eval(Linear2(0), x, y, autoattack=True, checks=False)


def test_step_size_is_stated_next_to_every_accuracy():
    x, y = linear_data()
    report = run_eval(Linear2(0), x[:16], y[:16], attacks=("fgsm", "fgsm-rs", "pgd", "cw"))
    res = report.results[0]
    for settings in res.settings.values():
        assert settings["alpha"] > 0 and settings["alpha_rule"]
    rs, plain = res.settings["fgsm-rs"], res.settings["fgsm"]
    assert rs["random_start"] and rs["alpha"] == pytest.approx(1.25 * EPS)
    assert not plain["random_start"] and plain["alpha"] == pytest.approx(EPS)
    table = format_table(report)
    assert f"PGD-20 (alpha {2.5 * EPS / 20:.4g} = 2.5 eps/steps)" in table
    assert f"CW-inf-30 (alpha {2.5 * EPS / 30:.4g} = 2.5 eps/steps)" in table
    assert f"FGSM (alpha {EPS:.4g} = eps)" in table
    assert f"FGSM-RS, random start (alpha {1.25 * EPS:.4g} = 1.25 eps)" in table
    given = format_table(run_eval(Linear2(0), x[:16], y[:16], attacks=("pgd",), alpha=0.001))
    assert "PGD-20 (alpha 0.001, given)" in given
