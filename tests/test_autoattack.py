"""AutoAttack as Croce & Hein run it: the components' settings, the hand-over of still-robust
examples from one component to the next, results no better than torchattacks' components run
directly, and the "fast" subset labelled as such in every output."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from fosctrain import autoattack as aa
from fosctrain.cli import build_parser
from fosctrain.errors import UserError
from fosctrain.evaluate import evaluate, format_table, write_report

torchattacks = pytest.importorskip("torchattacks")

SIDE = 6
EPS = 0.1


def tiny_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 10))
    return model.eval()


def tiny_data(model: nn.Module, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = 0.3 + 0.4 * torch.rand(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x).argmax(1)


def test_standard_suite_has_croce_and_hein_settings():
    suite = aa.build_suite(tiny_model(), "standard", EPS, "linf", 10, seed=3)
    assert [c.name for c in suite] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    apgd, apgdt, fab, square = (c.attack for c in suite)
    assert isinstance(apgd, torchattacks.APGD) and apgd.loss == "ce"
    assert isinstance(apgdt, torchattacks.APGDT) and isinstance(fab, torchattacks.FAB)
    assert isinstance(square, torchattacks.Square)
    assert apgd.steps == apgdt.steps == fab.steps == 100
    assert apgdt.n_target_classes == fab.n_target_classes == 9 and fab.multi_targeted
    assert square.n_queries == 5000
    for atk in (apgd, apgdt, fab, square):
        assert atk.n_restarts == 1 and atk.eps == EPS and atk.norm == "Linf" and atk.seed == 3
    assert suite[1].settings["target_classes"] == 9 and suite[3].settings["queries"] == 5000
    # What this replaces: torchattacks' own "standard" AutoAttack runs 10 steps.
    theirs = torchattacks.AutoAttack(tiny_model(), eps=EPS, n_classes=10, seed=0)
    assert [a.steps for a in theirs._autoattack.attacks[:3]] == [10, 10, 10]


def test_fast_suite_and_l2_norm():
    fast = aa.build_suite(tiny_model(), "fast", 0.5, "l2", 10, seed=0)
    assert [c.name for c in fast] == ["apgd-ce", "apgd-t"]
    assert all(c.attack.norm == "L2" and c.attack.steps == 100 for c in fast)


def test_version_names():
    assert aa.version_of(True) == "standard" and aa.version_of(None) is None
    assert aa.version_of("fast") == "apgd" and aa.version_of("none") is None
    with pytest.raises(UserError, match="AutoAttack version"):
        aa.version_of("plus")


class ReadsLabel(nn.Module):
    """Logits are the first 10 pixels: an example is classified as the index of its hot pixel;
    pixel 10 carries the example's id so that stubs can tell which examples they get."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


class Spy:
    """A stub component recording the ids it is given; it fools the ids in `fool`."""

    def __init__(self, fool: set[int]) -> None:
        self.fool, self.seen = fool, []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ids = (x.flatten(1)[:, 10] * 100).round().long().tolist()
        self.seen += ids
        out = x.clone()
        for row, (i, label) in enumerate(zip(ids, y.tolist(), strict=True)):
            if i in self.fool:
                out.view(len(ids), -1)[row, :10] = 0
                out.view(len(ids), -1)[row, (label + 1) % 10] = 1
        return out


def test_each_component_gets_only_the_examples_still_robust():
    n = 20
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, 1, 11)
    x.view(n, -1)[torch.arange(n), y] = 1
    x.view(n, -1)[:, 10] = torch.arange(n) / 100
    model = ReadsLabel()
    clean = torch.ones(n, dtype=torch.bool)
    clean[[3, 4]] = False  # misclassified clean: never attacked
    first, second, third = Spy({0, 2, 6, 8}), Spy({1, 5}), Spy(set())
    suite = [
        aa.Component(name, spy, {}) for name, spy in (("a", first), ("b", second), ("c", third))
    ]
    calls = []
    stages = aa.run_suite(model, suite, x, y, clean, batch_size=8, on_batch=calls.append)
    masks = {name: stage.robust for name, stage in stages.items()}
    robust = [i for i in range(n) if i not in (3, 4)]
    assert sorted(first.seen) == robust
    assert sorted(second.seen) == [i for i in robust if i not in (0, 2, 6, 8)]
    assert sorted(third.seen) == [i for i in robust if i not in (0, 1, 2, 5, 6, 8)]
    assert masks["a"].sum() == n - 2 - 4 and masks["b"].sum() == n - 2 - 6
    assert torch.equal(masks["c"], masks["b"])
    assert calls == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # progress: one call per batch


def test_fast_is_no_better_than_torchattacks_components_and_labelled(tmp_path):
    model = tiny_model()
    x, y = tiny_data(model)
    report = evaluate(
        model,
        x,
        y,
        eps_list=[EPS],
        attacks=("pgd",),
        autoattack="fast",
        checks=False,
        progress=False,
        batch_size=10,
    )
    res = report.results[0]
    fast = res.attacks["apgd-ce+t"]
    assert "autoattack" not in res.attacks
    cumulative = [res.attacks[f"apgd-ce+t/{c}"].correct for c in ("apgd-ce", "apgd-t")]
    assert cumulative[0] >= cumulative[1] == fast.correct
    with torch.no_grad():
        for atk in (
            torchattacks.APGD(model, eps=EPS, steps=100, seed=0),
            torchattacks.APGDT(model, eps=EPS, steps=100, n_classes=10, seed=0),
        ):
            direct = int((model(atk(x, y)).argmax(1) == y).sum())
            assert fast.correct <= direct
    assert res.worst_case.correct <= fast.correct
    assert res.settings["apgd-ce+t"]["version"] == "apgd"
    json_path, csv_path = write_report(report, tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["settings"]["autoattack"] == "apgd"
    assert saved["settings"]["autoattack_label"] == "apgd-ce+t"
    with csv_path.open() as f:
        names = [r["attack"] for r in csv.DictReader(f)]
    assert names == [
        "clean",
        "pgd",
        "apgd-ce+t/apgd-ce",
        "apgd-ce+t/apgd-t",
        "apgd-ce+t",
        "worst_case",
    ]
    table = format_table(report)
    assert "apgd-ce+t (apgd): APGD-CE + APGD-T" in table
    assert "APGD-T, 100 steps, 9 target classes" in table


def test_standard_reports_every_component():
    model = tiny_model()
    x, y = tiny_data(model, 8)
    report = evaluate(
        model, x, y, eps_list=[EPS], attacks=(), autoattack=True, checks=False, progress=False
    )
    res = report.results[0]
    names = [f"autoattack/{c}" for c in aa.COMPONENTS["standard"]]
    counts = [res.attacks[k].correct for k in names]
    assert counts == sorted(counts, reverse=True)
    assert res.attacks["autoattack"].correct == counts[-1]
    assert res.settings["autoattack"]["version"] == "standard"
    assert set(res.time_s) >= set(names)


@pytest.mark.parametrize(
    "flags,version",
    [([], "apgd"), (["--autoattack"], "standard"), (["--autoattack", "none"], "none")],
)
def test_cli_flag(flags, version):
    args = build_parser(["eval"]).parse_args(["eval", "run", *flags])
    assert args.autoattack == version
    with pytest.raises(UserError, match="invalid choice"):
        build_parser(["eval"]).parse_args(["eval", "run", "--autoattack", "plus"])
