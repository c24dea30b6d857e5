"""Validation and the final test in a run (fosctrain.validation): a validation slice of the
training data picks `best` while the test set is touched once, the step of the reporting PGD is
stated next to every number (and --eval-alpha changes it), and an L2 run validates with L2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_run

from fosctrain import train as train_mod
from fosctrain.attacks import ATTACKS, PGD, PGDL2
from fosctrain.checkpoint import load_latest_valid
from fosctrain.commands.train import report
from fosctrain.data import load_mnist5k
from fosctrain.errors import UserError
from fosctrain.methods import create_method
from fosctrain.rundir import load_model
from fosctrain.trainer import load_data
from fosctrain.validation import val_accuracy


def test_l2_calibration_and_per_epoch_test_use_l2(model_and_digits):
    model, x, y = model_and_digits
    m = create_method(small_run(method="dat", norm="l2", eps=2.0, c_max="auto", steps=2))
    assert "c_max auto" in m.calibrate(model, x, y, torch.Generator().manual_seed(0))
    assert m.c_max > 0
    cfg = small_run(norm="l2", eps=2.0, steps=2)
    got = val_accuracy(model, x, y, cfg, 0)
    model.eval()
    attack = PGDL2(eps=2.0, alpha=cfg.eval_step_size, steps=cfg.eval_steps)
    adv = attack(model, x, y, generator=torch.Generator().manual_seed(0)).x_adv
    with torch.no_grad():
        expected = (model(adv).argmax(1) == y).double().mean().item()
    assert got["robust_acc"] == pytest.approx(expected)
    assert got["clean_acc"] == (model(x).argmax(1) == y).double().mean().item() > expected


# --------------------------------------- the validation slice picks best, the test set is used once


@pytest.fixture
def spy(monkeypatch):
    """Every val_accuracy / final_accuracy call: its split and inputs; validation robust
    accuracy follows VAL (0.3, 0.7, 0.5 over three epochs), the test set gets 0.99."""
    calls = []
    val = iter([0.3, 0.7, 0.5])

    def fake_val(model, x, y, config, seed, dist=None):
        calls.append(("validation", x.clone()))
        return {"clean_acc": 0.9, "robust_acc": next(val)}

    def fake_test(model, x, y, config, seed, dist=None):
        calls.append(("test", x.clone()))
        return {"clean_acc": 0.9, "robust_acc": 0.99}

    monkeypatch.setattr(train_mod, "val_accuracy", fake_val)
    monkeypatch.setattr(train_mod, "final_accuracy", fake_test)
    return calls


def test_best_is_chosen_by_validation_and_the_test_set_is_used_once(tmp_path, spy):
    config = small_run(epochs=3, method="natural", steps=2)
    tr = train_mod.build_trainer(config, tmp_path / "r", progress=False)
    summary = train_mod.fit(tr)
    splits = [s for s, _ in spy]
    assert splits == ["validation"] * 3 + ["test"]
    assert all(torch.equal(x, tr.data.x_val) for s, x in spy if s == "validation")
    test_rows = {bytes(r.numpy()) for r in load_mnist5k().x_test.flatten(1)}
    assert all(bytes(r.numpy()) in test_rows for r in spy[-1][1].flatten(1))
    best, _ = load_latest_valid(tmp_path / "r", "best")
    assert json.loads(best.state()["run"])["epoch"] == 2
    assert summary["best"]["epoch"] == 2 and summary["best"]["val_robust_acc"] == 0.7
    assert summary["test"]["robust_acc"] == 0.99
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert [r["val_robust_acc"] for r in rows] == [0.3, 0.7, 0.5]
    assert not any(k.startswith("test_") for r in rows for k in r)
    assert "validation slice of 40 training examples" in summary["validation"]["split"]
    assert "48 test examples" in summary["test"]["split"]
    text = report(summary)
    assert "on the 48 test examples" in text and "validation slice of 40 training" in text


def test_no_validation_means_no_best(tmp_path, spy):
    summary = train_mod.train(
        small_run(method="natural", val_n=0, steps=2), tmp_path / "r", progress=False
    )
    assert [s for s, _ in spy] == ["test"]
    assert summary["best"] is None and not (tmp_path / "r" / "best.safetensors").exists()
    assert "no best checkpoint" in summary["validation"]["split"]
    assert "no best checkpoint" in report(summary)


# --------------------------------------------------------------------------- reporting step


def test_reporting_step_is_stated_and_eval_alpha_changes_it(tmp_path, monkeypatch):
    pgd_val = dict(method="natural", steps=2, val_attack="pgd")  # validation by PGD too
    summary = train_mod.train(small_run(eval_steps=20, **pgd_val), tmp_path / "a")
    test = summary["test"]
    assert test["step_size"] == pytest.approx(2.5 * 0.3 / 20)
    assert test["attack"] == "PGD-20 (eps 0.3, step 0.0375 = 2.5 eps/20, random start)"
    assert summary["validation"]["attack"] == test["attack"]
    line = [s for s in report(summary).splitlines() if s.startswith("PGD-20 accuracy")][0]
    assert "on the 48 test examples (PGD-20 (eps 0.3, step 0.0375 = 2.5 eps/20" in line

    alphas = []

    class Recorded(PGD):
        def __call__(self, *a, **k):
            alphas.append(self.step_size)
            return super().__call__(*a, **k)

    monkeypatch.setitem(ATTACKS, "pgd", Recorded)  # what create_attack("pgd") builds
    summary = train_mod.train(small_run(eval_alpha=0.075, **pgd_val), tmp_path / "b")
    assert alphas and set(alphas) == {0.075}
    assert summary["test"]["step_size"] == 0.075
    assert "step 0.075 = --eval-alpha" in summary["test"]["attack"]
    with pytest.raises(UserError, match="eval_alpha"):
        small_run(eval_alpha=-1.0, steps=2)


def test_best_is_chosen_under_the_default_validation_attack_apgd_ce_10(tmp_path):
    """The default validation attack is issue 18's choice, APGD-CE of 10 steps, and `best` and
    the logged validation accuracy are what torchattacks' own APGD-CE (10 steps, the run's
    seed) leaves of the validation slice."""
    torchattacks = pytest.importorskip("torchattacks")
    config = small_run(method="madry", epochs=2, steps=2)
    assert config.val_attack == "apgd-ce-10"
    summary = train_mod.train(config, tmp_path / "r", progress=False)
    assert summary["validation"]["attack"].startswith("APGD-CE-10")
    data = load_data(config)
    x, y = data.x_val, data.y_val
    model = load_model(tmp_path / "r", which="best").model.eval()
    apgd = torchattacks.APGD(model, eps=config.eps, steps=10, seed=config.seed, loss="ce")
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        robust = clean & (model(apgd(x, y)).argmax(1) == y)
    assert summary["best"]["val_robust_acc"] == pytest.approx(robust.double().mean().item())
    epochs = [r["val_robust_acc"] for r in [summary["final"], summary["best"]]]
    assert summary["best"]["val_robust_acc"] == max(epochs)
