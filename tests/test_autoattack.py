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
    # the gradient-free check reads the suite's results, checks or not: nothing to flag here
    assert res.checks["gradient_attacks_acc"] == res.attacks["autoattack/fab-t"].acc
    assert res.checks["gradient_free_acc"] == res.attacks["autoattack"].acc
    assert not report.warnings


class _NoGradient(torch.autograd.Function):
    """Identity forward, zero gradient backward: a model whose gradients say nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


class Flat(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_NoGradient.apply(x))


def test_square_beating_the_gradient_attacks_is_flagged_even_with_checks_off():
    model = tiny_model()
    x, y = tiny_data(model, 8)
    masked = evaluate(
        Flat(model), x, y, eps_list=[2 * EPS], attacks=(), autoattack=True, checks=False,
        progress=False,
    )  # fmt: skip
    res = masked.results[0]  # the gradient attacks leave 8 of 8, Square 1
    assert res.checks["gradient_attacks_acc"] == 1.0 and res.checks["gradient_free_acc"] < 0.5
    assert sum("Square (gradient-free)" in w for w in masked.warnings) == 1


@pytest.mark.parametrize(
    "flags,version",
    [([], "apgd"), (["--autoattack"], "standard"), (["--autoattack", "none"], "none")],
)
def test_cli_flag(flags, version):
    args = build_parser(["eval"]).parse_args(["eval", "run", *flags])
    assert args.autoattack == version
    with pytest.raises(UserError, match="invalid choice"):
        build_parser(["eval"]).parse_args(["eval", "run", "--autoattack", "plus"])


# ---------------------------------------------------------------- cost, resume, reuse


class _Killed(Exception):
    pass


class KillAfter(nn.Module):
    """The model, raising once after `budget` gradient passes (a killed evaluation)."""

    def __init__(self, model: nn.Module, budget: int) -> None:
        super().__init__()
        self.model, self.budget = model, budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            self.budget -= 1
            if self.budget == 0:
                raise _Killed
        return self.model(x)


def _aa(model, x, y, **kw):
    kw = {"attacks": (), "checks": False, "progress": False, "batch_size": 8, **kw}
    return evaluate(model, x, y, eps_list=[EPS], **kw).results[0]


class Count(nn.Module):
    """The model, counting its gradient passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.passes = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            self.passes += 1
        return self.model(x)


def test_a_killed_autoattack_resumes_from_its_last_finished_batch(tmp_path):
    model = tiny_model()
    x, y = tiny_data(model, 24)
    whole = _aa(model, x, y, autoattack="standard")
    counted = Count(model)
    _aa(counted, x, y, autoattack="apgd")
    state = tmp_path / "resume"
    # killed at the very last gradient pass of APGD-T: inside its third and last batch
    with pytest.raises(_Killed):
        _aa(KillAfter(model, counted.passes), x, y, autoattack="standard", resume=state)
    saved = json.loads((state / "autoattack-eps0.json").read_text())
    assert saved["done"].keys() == {"apgd-ce"} and saved["current"] == "apgd-t"
    assert saved["next_start"] == 16  # two of APGD-T's three batches finished
    again = Count(model)
    resumed = _aa(again, x, y, autoattack="standard", resume=state)
    for name in ("autoattack/apgd-ce", "autoattack/apgd-t", "autoattack"):
        assert resumed.attacks[name].correct == whole.attacks[name].correct
    assert torch.equal(resumed.per_example["autoattack"], whole.per_example["autoattack"])
    assert resumed.grad_evals["autoattack"] == whole.grad_evals["autoattack"]  # sums carried
    fresh = Count(model)
    _aa(fresh, x, y, autoattack="standard")
    assert again.passes < fresh.passes  # APGD-CE and two batches of APGD-T were not run again


def test_a_state_of_other_work_is_not_resumed(tmp_path):
    model = tiny_model()
    x, y = tiny_data(model, 16)
    _aa(model, x, y, autoattack="apgd", resume=tmp_path)
    other = _aa(model, x[:8], y[:8], autoattack="apgd", resume=tmp_path)  # other digits
    assert other.attacks["apgd-ce+t"].n == 8


def test_costs_are_counted_and_masks_are_per_example(tmp_path):
    model = tiny_model()
    x, y = tiny_data(model, 16)
    res = _aa(model, x, y, attacks=("pgd",), autoattack="apgd", pgd_steps=5)
    assert res.grad_evals["pgd"] == 16 * 5
    ce = res.grad_evals["apgd-ce+t/apgd-ce"]
    assert 16 * 100 <= ce <= 16 * 102  # 100 steps (+ the start's gradient) per clean-correct
    assert res.grad_evals["apgd-ce+t"] == ce + res.grad_evals["apgd-ce+t/apgd-t"]
    masks = res.per_example
    assert torch.equal(masks["worst_case"], masks["clean"] & masks["pgd"] & masks["apgd-ce+t"])
    assert res.worst_case.correct == int(masks["worst_case"].sum())
    assert all(len(m) == 16 for m in masks.values())


def test_known_components_are_not_run_again():
    model = tiny_model()
    x, y = tiny_data(model, 16)
    apgd = _aa(model, x, y, autoattack="apgd")
    from fosctrain.evaluate import known_stages
    from fosctrain.report import EvalReport

    report = EvalReport(16, "linf", 0, [apgd], {}).to_dict()
    known = known_stages(report, 8)
    assert set(known) == {"apgd-ce", "apgd-t"} and all(len(m) == 8 for m in known.values())
    after = _aa(model, x[:8], y[:8], autoattack="standard", known=known)
    assert after.grad_evals["autoattack/apgd-ce"] == after.grad_evals["autoattack/apgd-t"] == 0
    assert after.attacks["autoattack/apgd-t"].correct == int(known["apgd-t"].sum())
    assert after.attacks["autoattack"].correct <= int(known["apgd-t"].sum())


def test_a_batchnorm_model_stays_in_eval_mode_and_matches_torchattacks():
    """The counting wrapper must not leave the model in training mode (BatchNorm on batch
    statistics) after a torchattacks call: the suite's numbers equal torchattacks' own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)
        )
        model.train()
        model(torch.rand(64, 1, SIDE, SIDE))  # running statistics far from any small batch's
        model.eval()
    x, y = tiny_data(model, 16)
    suite = aa.build_suite(model, "apgd", EPS, "linf", 10, seed=0)
    stages = aa.run_suite(model, suite, x, y, torch.ones(16, dtype=torch.bool), 16)
    assert not model.training  # as it was given
    direct = torchattacks.APGD(model, eps=EPS, steps=100, seed=0)(x, y)
    with torch.no_grad():
        expected = model(direct).argmax(1) == y
    assert torch.equal(stages["apgd-ce"].robust, expected)


def test_the_suite_leaves_the_global_rng_as_it_found_it():
    """torchattacks' APGD reseeds the global RNG; the suite restores it, so that a run that
    validates with APGD draws the same training randomness as one that does not."""
    model = tiny_model()
    x, y = tiny_data(model, 8)
    suite = aa.build_suite(model, "apgd", EPS, "linf", 10, seed=0, steps=5, targets=2)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    aa.run_suite(model, suite, x, y, torch.ones(8, dtype=torch.bool), 8)
    assert torch.equal(torch.get_rng_state(), before)
    direct = torchattacks.APGD(model, eps=EPS, steps=5, seed=0)
    torch.manual_seed(1234)
    direct(x, y)
    assert not torch.equal(torch.get_rng_state(), before)  # what the suite undoes
