"""Numbers you can trust (issue 10, training side): L2 training is L2 end to end, a validation
slice of the training data picks `best` while the test set is touched once, and the step of
the reporting PGD is stated next to every number."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_run

from fosctrain import train as train_mod
from fosctrain import trainer as trainer_mod
from fosctrain.attacks import ATTACKS, PGD, PGDL2
from fosctrain.checkpoint import load_latest_valid
from fosctrain.commands.train import report
from fosctrain.config import resolve
from fosctrain.data import load_mnist5k, stratified_split
from fosctrain.errors import UserError
from fosctrain.losses import input_gradient, objective
from fosctrain.methods import create_method
from fosctrain.models import create_model
from fosctrain.validation import val_accuracy

ATTACKING = ("madry", "cat", "dat", "fat", "trades", "fast")


def small(**kw):
    return small_run(**{"steps": 2, **kw})


# --------------------------------------------------------------------------- L2 end to end


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    data = load_mnist5k()
    return create_model("mnist-cnn").eval(), data.x_train[:32], data.y_train[:32]


@pytest.mark.parametrize("method", ATTACKING)
def test_l2_training_examples_lie_in_the_l2_ball(method, batch):
    """--norm l2 --eps 2: an L-inf box of 2 covers all of [0, 1], so L-inf training examples
    move far beyond an L2 distance of 2 (the old code); L2 examples stay inside it and use it."""
    model, x, y = batch
    config = small(method=method, norm="l2", eps=2.0, steps=5, c_max=0.0, t_prime=1)
    m = create_method(config)
    assert isinstance(m.attack(1.0), PGDL2)
    result = m.make_batch(model, x, y, 1.0, torch.Generator().manual_seed(0))
    dist = (result.x_adv - x).flatten(1).norm(dim=1)
    assert float(dist.max()) <= 2.0 + 1e-5
    assert float(dist.max()) > 1.0  # the attack moved: not a vacuous bound
    assert float((result.x_adv - x).abs().max()) > 0  # some pixel moved


def test_l2_fosc_is_the_l2_formula(batch):
    """Madry, 2 L2 steps without random start: the FOSC reported for the training batch is
    eps ||g||_2 - <x1 - x0, g> at the first step x1 = clip(x0 + alpha g0 / ||g0||_2), with the
    gradients recomputed here (the L-inf formula uses ||g||_1 and differs)."""
    model, x, y = batch
    config = small(method="madry", norm="l2", eps=2.0, steps=2, random_start=False)
    result = create_method(config).make_batch(model, x, y, 0.0, torch.Generator())
    f = objective("ce", False)
    g0 = input_gradient(model, x, y, f)[0].flatten(1)
    step = (0.5 * g0 / g0.norm(dim=1, keepdim=True)).view_as(x)
    x1 = (x + step).clamp(0, 1)
    g1 = input_gradient(model, x1, y, f)[0].flatten(1)
    expected = 2.0 * g1.norm(dim=1) - ((x1 - x).flatten(1) * g1).sum(1)
    torch.testing.assert_close(result.fosc, expected, rtol=1e-4, atol=1e-5)


def test_l2_calibration_and_per_epoch_test_use_l2(batch):
    model, x, y = batch
    m = create_method(small(method="dat", norm="l2", eps=2.0, c_max="auto"))
    assert "c_max auto" in m.calibrate(model, x, y, torch.Generator().manual_seed(0))
    assert m.c_max > 0
    cfg = small(norm="l2", eps=2.0)
    got = val_accuracy(model, x, y, cfg, 0)
    model.eval()
    attack = PGDL2(eps=2.0, alpha=cfg.eval_step_size, steps=cfg.eval_steps)
    adv = attack(model, x, y, generator=torch.Generator().manual_seed(0)).x_adv
    with torch.no_grad():
        expected = (model(adv).argmax(1) == y).double().mean().item()
    assert got["robust_acc"] == pytest.approx(expected)
    assert got["clean_acc"] == (model(x).argmax(1) == y).double().mean().item() > expected


def test_fosc_box_with_l2_is_refused():
    with pytest.raises(UserError, match="fosc-box"):
        resolve(overrides={"norm": "l2", "eps": 2.0, "fosc_box": True})


def test_l2_run_trains_and_reports_l2(tmp_path):
    summary = train_mod.train(small(method="dat", norm="l2", eps=2.0), tmp_path / "r")
    assert summary["test"]["norm"] == "l2" and "L2" in summary["test"]["attack"]
    assert summary["final"]["fosc_mean"] > 0


# --------------------------------------------------------------------------- validation slice


def test_validation_slice_is_stratified_disjoint_and_fixed():
    y = load_mnist5k().y_train  # 400 of each digit
    torch.manual_seed(1)
    train, val = stratified_split(y, 500)
    torch.manual_seed(2)
    train2, val2 = stratified_split(y, 500)
    assert torch.equal(val, val2) and torch.equal(train, train2)  # whatever the global seed
    assert len(val) == 500 and len(train) == 3500
    assert not set(val.tolist()) & set(train.tolist())
    assert sorted(val.tolist() + train.tolist()) == list(range(4000))
    assert torch.bincount(y[val], minlength=10).tolist() == [50] * 10
    uneven = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    counts = torch.bincount(uneven[stratified_split(uneven, 10)[1]], minlength=3).tolist()
    assert counts == [7, 2, 1]
    with pytest.raises(UserError, match="nothing to train"):
        stratified_split(uneven, 100)


def test_run_trains_on_nothing_it_validates_on():
    config = small(train_n=0, val_n=200)
    data = trainer_mod.load_data(config)
    assert len(data.y_train) == 3800 and len(data.y_val) == 200
    train_rows = {bytes(r.numpy()) for r in data.x_train.flatten(1)}
    assert not any(bytes(r.numpy()) in train_rows for r in data.x_val.flatten(1))
    assert torch.bincount(data.y_val, minlength=10).tolist() == [20] * 10
    other_seed = trainer_mod.load_data(small(train_n=0, val_n=200, seed=7))
    assert torch.equal(other_seed.x_val, data.x_val)


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
    config = small(epochs=3, method="natural")
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
    summary = train_mod.train(small(method="natural", val_n=0), tmp_path / "r", progress=False)
    assert [s for s, _ in spy] == ["test"]
    assert summary["best"] is None and not (tmp_path / "r" / "best.safetensors").exists()
    assert "no best checkpoint" in summary["validation"]["split"]
    assert "no best checkpoint" in report(summary)


# --------------------------------------------------------------------------- reporting step


def test_reporting_step_is_stated_and_eval_alpha_changes_it(tmp_path, monkeypatch):
    summary = train_mod.train(small(method="natural", eval_steps=20), tmp_path / "a")
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
    summary = train_mod.train(small(method="natural", eval_alpha=0.075), tmp_path / "b")
    assert alphas and set(alphas) == {0.075}
    assert summary["test"]["step_size"] == 0.075
    assert "step 0.075 = --eval-alpha" in summary["test"]["attack"]
    with pytest.raises(UserError, match="eval_alpha"):
        small(eval_alpha=-1.0)
