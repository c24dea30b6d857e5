"""Tests of fosctrain.measure: the per-step loop agrees with the attack engine, the table and
CSV are right, bad input is a UserError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fosctrain.attacks.engine import AttackSpec, run_attack
from fosctrain.errors import UserError
from fosctrain.fosc import fosc_stats
from fosctrain.losses import cross_entropy
from fosctrain.measure import (
    CSV_COLUMNS,
    MeasureResult,
    format_measure,
    measure_convergence,
    write_measure,
)

N = 48


@pytest.fixture
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("fosc_box", [False, True])
def test_fosc_rows_equal_the_engine_trace(setup, fosc_box):
    model, x, y = setup
    steps, eps, alpha = 6, 0.1, 0.025
    result = measure_convergence(
        model, x, y, eps=eps, alpha=alpha, steps=steps, seed=5, batch_size=N, fosc_box=fosc_box
    )
    ref = run_attack(
        model,
        x,
        y,
        AttackSpec(eps=eps, alpha=alpha, steps=steps, final_fosc=True, fosc_box=fosc_box),
        generator=torch.Generator().manual_seed(5),
    )
    assert result.step == list(range(steps + 1))
    for k in range(steps + 1):
        stats = fosc_stats(ref.fosc_trace[k])
        assert result.fosc_mean[k] == pytest.approx(stats["mean"], rel=1e-5, abs=1e-9)
        assert result.fosc_median[k] == pytest.approx(stats["median"], rel=1e-5, abs=1e-9)
    with torch.no_grad():
        logits = model(ref.x_adv)
    assert result.accuracy[-1] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert result.loss_mean[-1] == pytest.approx(cross_entropy(logits, y).mean().item(), rel=1e-5)


def test_pgd_raises_the_loss_and_batches_do_not_matter(setup):
    model, x, y = setup
    whole = measure_convergence(model, x, y, eps=0.1, steps=10, random_start=False, batch_size=N)
    split = measure_convergence(model, x, y, eps=0.1, steps=10, random_start=False, batch_size=7)
    assert whole.accuracy[0] == 1.0
    assert whole.loss_mean[-1] > whole.loss_mean[0]
    assert whole.accuracy[-1] < whole.accuracy[0]
    assert whole.fosc_mean == pytest.approx(split.fosc_mean, rel=1e-4)
    assert whole.settings["alpha"] == pytest.approx(0.025)
    assert whole.settings["random_start"] is False
    assert all(
        lo <= med <= hi
        for lo, med, hi in zip(whole.fosc_p10, whole.fosc_median, whole.fosc_p90, strict=True)
    )


def test_cw_loss_and_l2(setup):
    model, x, y = setup
    cw = measure_convergence(model, x, y, eps=0.1, steps=3, loss="cw")
    assert cw.loss_mean[-1] > cw.loss_mean[0]
    l2 = measure_convergence(model, x, y, eps=1.0, steps=3, norm="l2")
    assert len(l2.step) == 4 and l2.settings["norm"] == "l2"


def test_csv_round_trip_and_table(setup, tmp_path):
    model, x, y = setup
    result = measure_convergence(model, x, y, eps=0.1, steps=25)
    path = write_measure(result, tmp_path / "m")
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS) and len(lines) == 27
    back = MeasureResult.from_csv(path)
    assert back.step == result.step
    assert back.fosc_mean == pytest.approx(result.fosc_mean, rel=1e-6)
    assert back.accuracy == pytest.approx(result.accuracy, rel=1e-6)
    table = format_measure(result)
    rows = table.splitlines()[2:]
    assert rows[0].split()[0] == "0" and rows[-1].split()[0] == "25"
    assert 5 <= len(rows) <= 14


def test_bad_csv_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a measure.csv"):
        MeasureResult.from_csv(bad)
    bad.write_text(",".join(CSV_COLUMNS) + "\n0,1,2\n")
    with pytest.raises(UserError, match="bad row"):
        MeasureResult.from_csv(bad)
    with pytest.raises(UserError, match="cannot read"):
        MeasureResult.from_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": float("nan")}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 2.0}, "eps"),
        ({"eps": 0.1, "alpha": -1.0}, "step size"),
        ({"eps": 0.1, "steps": 0}, "steps"),
        ({"eps": 0.1, "loss": "hinge"}, "loss"),
        ({"eps": 0.1, "norm": "l1"}, "norm"),
        ({"eps": 0.1, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_is_a_user_error(setup, kwargs, match):
    model, x, y = setup
    with pytest.raises(UserError, match=match):
        measure_convergence(model, x, y, **kwargs)
