"""The methods as a drop-in API: docs/API.md's example runs, DAT.loss gives the training loop's
batch, every method works in a user's loop, options come from Config, hooks round-trip; the
class hooks (defaults, validate, check_world, report_lines) on every path; L2 training examples
and FOSC; DAT's options beyond Algorithm 1 (target schedules, dat_min_steps, the batch-quantile
target, c_max calibrated on the initial model or on the first training batches at the rule's
first check); and nothing outside methods.py asks which method runs."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import fresh_model, paper_mnist_cnn, small_run

from fosctrain import config as config_mod
from fosctrain import methods
from fosctrain import train as train_mod
from fosctrain import trainer as trainer_mod
from fosctrain.attacks import APGD, PGD, PGDL2, BatchQuantile, FoscThreshold
from fosctrain.cli import main
from fosctrain.config import Config, resolve
from fosctrain.data import load_mnist5k
from fosctrain.distributed import Dist
from fosctrain.errors import UserError
from fosctrain.fosc import fosc, relative_fosc
from fosctrain.losses import input_gradient, objective
from fosctrain.methods import DAT, METHODS, Info, create_method
from fosctrain.models import create_model
from fosctrain.rundir import build_model

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"
MARK = "<!-- drop-in-example -->"


@pytest.fixture(scope="module")
def batch():
    data = load_mnist5k()
    return data.x_train[:48], data.y_train[:48]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_api_doc_drop_in_example_runs(one_thread, capsys):
    """Exactly docs/API.md's code block between the markers, executed."""
    parts = API_DOC.read_text().split(MARK)
    assert len(parts) == 3, "docs/API.md must hold one drop-in example between two markers"
    code = re.fullmatch(r"\s*```python\n(.*)```\s*", parts[1], re.S)
    assert code is not None
    namespace: dict = {}
    exec(compile(code.group(1), str(API_DOC), "exec"), namespace)
    info, loss, model = namespace["info"], namespace["loss"], namespace["model"]
    assert isinstance(info, Info) and math.isfinite(loss.item())
    assert 1 <= info.steps_mean <= 10 and 0 < info.fosc_median < math.inf
    assert info.grad_evals == info.attack_grad_evals + 128  # one training pass per example
    assert info.fosc_target == pytest.approx(0.25)  # c_t at epoch 1 of T' = 2 from 0.5
    assert model.training
    assert capsys.readouterr().out.count("epoch") == 2


def test_dat_loss_gives_the_loops_training_batch(tmp_path, batch):
    """DAT built from keywords, in a plain loop with Adam, takes the very optimizer step the
    training loop's train_batch takes with the same generator: equal weights afterwards."""
    x, y = batch
    cfg = resolve(overrides=dict(method="dat", c_max=1.0, steps=4, t_prime=3, epochs=4))
    tr = train_mod.build_trainer(cfg, tmp_path / "r", progress=False)
    model = copy.deepcopy(tr.model)
    generator = torch.Generator().set_state(tr.generator.get_state())
    stats = train_mod.train_batch(tr, x, y, 1.0, 1)

    dat = DAT(c_max=1.0, steps=4, t_prime=3)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss, info = dat.loss(model, x, y, 1, generator=generator)
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert loss.item() == pytest.approx(stats["loss_sum"] / len(y), rel=1e-6)
    assert info.steps_mean == stats["steps_sum"] / len(y)
    assert info.grad_evals == stats["attack_evals"] + stats["train_evals"]
    assert info.fosc_target == pytest.approx(2 / 3)
    assert 0 < info.steps_mean < 4  # the threshold stopped some samples early
    ours = model.state_dict()
    for name, weights in tr.model.state_dict().items():
        assert torch.equal(weights, ours[name]), name
    tr.lock.release()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_works_through_the_drop_in_api(name, batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("mnist-cnn")
    target = {} if name == "dat-trades" else {"c_max": 0.3}  # it takes no absolute target
    method = METHODS[name](eps=0.3, steps=3, t_prime=2, **target)
    loss, info = method.loss(model, x, y, 1.5, generator=torch.Generator().manual_seed(0))
    assert model.training  # back in train mode for the training forward
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert info.grad_evals == info.attack_grad_evals + method.passes * len(y)
    if name == "natural":
        assert info.attack_grad_evals == 0 and info.steps_mean == 0
        assert math.isnan(info.fosc_mean)
    else:
        assert info.attack_grad_evals > 0 and 1 <= info.steps_mean <= 3
        assert info.fosc_p90 >= info.fosc_median >= 0
    assert math.isnan(info.fosc_target) != (name == "dat")  # a c_max target (quantile: NaN)


def test_methods_are_registered_once_by_the_configs_names():
    assert set(METHODS) == set(config_mod.METHODS)
    expected = {
        "natural": "Natural",
        "madry": "Madry",
        "cat": "CAT",
        "dat": "DAT",
        "fat": "FAT",
        "trades": "TRADES",
        "fast": "FastAT",
    }
    for name, cls in expected.items():
        method = create_method(resolve(overrides={"method": name}))
        assert type(method).__name__ == cls and method.name == name
    assert methods.Method not in METHODS.values()  # the base is no method of its own


def test_options_are_config_fields_checked_like_configs():
    dat = DAT(eps=0.1, c_max=0.5, t_prime=40)
    assert (dat.config.eps, dat.c_max, dat.config.schedule_epochs) == (0.1, 0.5, 40)
    assert dat.config.method == "dat" and dat.config.step_size == pytest.approx(0.05)
    assert (dat.config.steps, DAT(eps=0.1, steps=10).config.step_size) == (5, pytest.approx(0.025))
    with pytest.raises(UserError, match="unknown option"):
        DAT(epsilon=0.3)
    with pytest.raises(UserError, match="eps"):
        DAT(eps=-1.0)
    with pytest.raises(UserError, match="cannot be built"):
        DAT(resolve(overrides={"method": "madry"}))


def test_dat_auto_c_max_is_calibrated_on_the_first_batch_and_kept_in_its_state(batch):
    x, y = batch
    dat = DAT(steps=3, c_max="auto")
    assert dat.c_max is None and dat.extra_metrics() == {"c_max": None}
    dat.loss(create_model("mnist-cnn"), x, y, 0, generator=torch.Generator().manual_seed(0))
    assert dat.c_max > 0 and dat.state() == {"c_max": dat.c_max}
    again = DAT(steps=3, c_max="auto")
    again.load_state(dat.state())
    assert again.c_max == dat.c_max
    assert again.calibrate(None, x, y, None) is None  # already calibrated: nothing to do
    madry = METHODS["madry"]()
    assert madry.state() == {} and madry.extra_metrics() == {}
    assert madry.calibrate(None, x, y, None) is None


@pytest.mark.parametrize(
    ("preset", "options", "steps", "step_size"),
    [
        (None, {}, 5, 0.15),  # fosc train's default: DAT on PGD-5 of eps/2
        (None, {"eps": 0.1}, 5, 0.05),
        (None, {"steps": 10}, 10, 0.075),  # a given K keeps the step rule eps/4
        (None, {"steps": 5}, 5, 0.075),
        (None, {"alpha": 0.1}, 5, 0.1),
        (None, {"method": "madry"}, 10, 0.075),  # every other method: PGD-10 of eps/4
        (None, {"method": "fat"}, 10, 0.075),
        ("mnist-paper", {}, 10, 0.075),  # the paper's presets keep the paper's attack
        ("cifar10-wrn-paper", {"data_dir": "x"}, 10, 0.031 / 4),
    ],
)
def test_dat_sets_its_own_attack_budget_where_nothing_else_does(preset, options, steps, step_size):
    config = resolve(preset, None, options)
    assert (config.steps, config.step_size) == (steps, pytest.approx(step_size))


def test_dat_budget_from_a_toml_file_and_the_python_api(tmp_path):
    toml = tmp_path / "dat.toml"
    toml.write_text("steps = 7\n")
    assert (resolve(None, str(toml), {}).steps, resolve(None, str(toml), {}).alpha) == (7, None)
    assert (DAT().config.steps, DAT().config.alpha) == (5, pytest.approx(0.15))
    assert DAT(Config()).config.steps == 10  # a Config given whole is taken as it is


# --------------------------------------------------------------------------- the class hooks

DAT_OWN_DEFAULTS = {"steps": 5, "alpha": pytest.approx(0.15), "c_mode": "quantile"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_methods_defaults_are_the_same_on_every_path(name, tmp_path, capsys):
    """resolve (the API), `fosc train` options, a TOML file and the drop-in constructor give one
    Config: Config's defaults with what the method's `defaults` hook sets (DAT and its TRADES
    variant alone set any)."""
    own = METHODS[name].defaults(Config(method=name), set())
    assert own == (DAT_OWN_DEFAULTS if issubclass(METHODS[name], DAT) else {})
    expected = dataclasses.replace(Config(method=name), **own).to_dict()
    toml = tmp_path / "m.toml"
    toml.write_text(f'method = "{name}"\n')
    assert main(["train", "--print-config", "--method", name]) == 0
    out = capsys.readouterr().out
    paths = {
        "resolve": resolve(overrides={"method": name}).to_dict(),
        "cli": json.loads(out[out.index("{") :]),
        "toml": resolve(None, str(toml), {}).to_dict(),
        "drop-in": METHODS[name]().config.to_dict(),
    }
    for path, values in paths.items():
        assert values == expected, path


@pytest.mark.parametrize("preset", sorted(config_mod.PRESETS))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_presets_set_what_dat_would_so_no_method_adds_defaults(preset, name):
    """A preset names the attack and c_max, so no method sets anything of its own there."""
    values = {**config_mod.PRESETS[preset], "method": name, "data_dir": "x"}
    assert METHODS[name].defaults(Config(**values), set(values)) == {}
    if name == "dat-trades":  # the presets' absolute c_max is no target of its
        with pytest.raises(UserError, match="batch-quantile target only"):
            resolve(preset, None, {"method": name, "data_dir": "x"})
        return
    assert resolve(preset, None, {"method": name, "data_dir": "x"}) == Config(**values)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (set(), {"steps": 5, "alpha": 0.15, "c_mode": "quantile"}),
        ({"steps"}, {"c_mode": "quantile"}),  # a given K keeps the fields' step rule
        ({"alpha"}, {"steps": 5, "c_mode": "quantile"}),  # a given step, with DAT's 5 steps
        ({"c_max"}, {"steps": 5, "alpha": 0.15}),  # an absolute target asked for
        ({"c_mode"}, {"steps": 5, "alpha": 0.15}),
        ({"c_max_calibration", "steps", "alpha"}, {}),
    ],
)
def test_dat_defaults_step_aside_for_what_is_given(given, expected):
    assert DAT.defaults(Config(method="dat"), given) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"c_mode": "median"}, "unknown c mode 'median'"),
        ({"c_max": -1.0}, "c_max must be"),
        ({"c_max_quantile": 1.0}, "c_max_quantile must be in"),
        ({"dat_min_steps": 10, "steps": 10}, "dat_min_steps must be below steps"),
        ({"late_steps": 3}, "go together"),
        ({"late_steps": 3, "late_from": 1.0}, "applies to method madry only, not fat"),
    ],
)
def test_each_method_validates_its_own_options_whichever_method_runs(options, message, capsys):
    """DAT's and Madry's `validate` refuse their bad options on every path and for every
    method (a Config holds every method's options), one line and exit status 2 on the CLI."""
    config = Config(method="fat", **options)
    owner = DAT if "late_steps" not in options else METHODS["madry"]
    with pytest.raises(UserError, match=message):
        owner.validate(config)
    for other in METHODS.values():
        if not issubclass(other, owner):  # a variant of DAT checks DAT's options as its own
            other.validate(config)  # not theirs
    with pytest.raises(UserError, match=message):
        resolve(overrides={"method": "fat", **options})
    with pytest.raises(UserError, match=message):
        METHODS["fat"](**options)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert main(["train", "--print-config", "--method", "fat", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)


def test_madry_takes_its_late_steps():
    late = dict(late_steps=3, late_from=1.0)
    METHODS["madry"].validate(Config(method="madry", **late))
    assert METHODS["madry"](**late).attack(1.0).steps == 3


def test_dat_check_world_refuses_first_batches_in_more_than_one_process():
    first = Config(c_max_calibration="first-batches")
    with pytest.raises(UserError, match="one process only"):
        DAT.check_world(first, Dist(world=2))
    with pytest.raises(UserError, match="one process only"):
        trainer_mod.check_world(first, Dist(world=2), 128)  # the run asks every method
    DAT.check_world(first, Dist())  # one process: fine
    DAT.check_world(Config(c_max_calibration="initial"), Dist(world=2))
    for method in METHODS.values():
        if not issubclass(method, DAT):
            method.check_world(first, Dist(world=2))


def test_only_dat_adds_lines_to_the_closing_report():
    assert DAT.report_lines({"c_max": 0.12345}) == ["DAT c_max:            0.1235"]
    assert DAT.report_lines({"c_max": None}) == []
    others = [m for m in METHODS.values() if not issubclass(m, DAT)]
    assert others and all(m.report_lines({"c_max": 0.5}) == [] for m in others)


# --------------------------------------------------------------------------- L2 training

ATTACKING = ("madry", "cat", "dat", "fat", "trades", "fast")


@pytest.mark.parametrize("method", ATTACKING)
def test_l2_training_examples_lie_in_the_l2_ball(method, model_and_digits):
    """--norm l2 --eps 2: an L-inf box of 2 covers all of [0, 1], so L-inf training examples
    move far beyond an L2 distance of 2 (the old code); L2 examples stay inside it and use it."""
    model, x, y = model_and_digits
    config = small_run(method=method, norm="l2", eps=2.0, steps=5, c_max=0.0, t_prime=1)
    m = create_method(config)
    assert isinstance(m.attack(1.0), PGDL2)
    result = m.make_batch(model, x, y, 1.0, torch.Generator().manual_seed(0))
    dist = (result.x_adv - x).flatten(1).norm(dim=1)
    assert float(dist.max()) <= 2.0 + 1e-5
    assert float(dist.max()) > 1.0  # the attack moved: not a vacuous bound
    assert float((result.x_adv - x).abs().max()) > 0  # some pixel moved


def test_l2_fosc_is_the_l2_formula(model_and_digits):
    """Madry, 2 L2 steps without random start: the FOSC reported for the training batch is
    eps ||g||_2 - <x1 - x0, g> at the first step x1 = clip(x0 + alpha g0 / ||g0||_2), with the
    gradients recomputed here (the L-inf formula uses ||g||_1 and differs)."""
    model, x, y = model_and_digits
    config = small_run(method="madry", norm="l2", eps=2.0, steps=2, random_start=False)
    result = create_method(config).make_batch(model, x, y, 0.0, torch.Generator())
    f = objective("ce", False)
    g0 = input_gradient(model, x, y, f)[0].flatten(1)
    step = (0.5 * g0 / g0.norm(dim=1, keepdim=True)).view_as(x)
    x1 = (x + step).clamp(0, 1)
    g1 = input_gradient(model, x1, y, f)[0].flatten(1)
    expected = 2.0 * g1.norm(dim=1) - ((x1 - x).flatten(1) * g1).sum(1)
    torch.testing.assert_close(result.fosc, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ DAT's target schedules and rule


def test_quantile_mode_builds_a_batch_quantile_rule_that_decays():
    m = create_method(small_run(method="dat", c_mode="quantile", c_max_quantile=0.4, t_prime=4))
    assert [m.attack(t).stop.q for t in (0, 1, 2, 4, 5)] == pytest.approx([0.4, 0.3, 0.2, 0, 0])
    assert isinstance(m.attack(0).stop, BatchQuantile) and math.isnan(m.fosc_target(0))
    cos = create_method(small_run(method="dat", c_schedule="cosine", c_max=0.8, t_prime=4))
    assert [cos.fosc_target(t) for t in (0, 2, 4)] == pytest.approx([0.8, 0.4, 0])


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, 0), ({"first_step_always": True}, 1), ({"dat_min_steps": 2}, 2),
     ({"dat_min_steps": 2, "first_step_always": True}, 2)],
)  # fmt: skip
def test_the_rule_is_first_checked_at_dat_min_steps(options, expected, digits):
    m = create_method(small_run(method="dat", c_max=1e9, **options))
    pgd = m.attack(0.0)
    assert pgd.min_steps == expected
    x, y = digits
    result = pgd(fresh_model().eval(), x[:32], y[:32], generator=torch.Generator().manual_seed(0))
    assert result.steps.tolist() == [expected] * 32  # a huge target stops all at the floor


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"c_schedule": "step"}, "c schedule"),
        ({"c_mode": "median"}, "c mode"),
        ({"dat_min_steps": 3}, "dat_min_steps must be below"),
        ({"dat_min_steps": -1}, "dat_min_steps"),
        ({"fosc_relative": True, "c_max": 2.5}, "relative FOSC in \\[0, 2\\]"),
        ({"c_max_calibration": "warm"}, "c_max calibration"),
        ({"calibration_batches": 0}, "calibration_batches"),
    ],
)
def test_bad_dat_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        small_run(method="dat", **options)


# -------------------------------------------------------------------------- DAT's c_max calibration


def test_initial_calibration_of_the_default_run_is_pinned():
    """c_max_calibration "initial" (the default) is main's calibration bit for bit: on the
    default run (seed 0) the loop's sample of 512 training examples gives this c_max (pinned
    again when the splits became class-interleaved: the sample holds other digits since)."""
    config = Config()
    assert config.c_max_calibration == "initial" and config.c_max_quantile == 0.5
    data = trainer_mod.load_data(config)
    torch.manual_seed(config.seed)
    model = build_model(config.to_dict())
    n = len(data.y_train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 2))[:512]
    dat = create_method(config)
    gen = torch.Generator().manual_seed(config.seed + 1)
    line = dat.calibrate(model, data.x_train[pick], data.y_train[pick], gen)
    assert dat.c_max == pytest.approx(0.5222282707691193, abs=1e-7)
    assert line.startswith("c_max auto = 0.5222 (the 0.5-quantile of step-1 FOSC on 512")


def _fosc_at(
    model,
    x,
    y,
    k: int,
    seed: int,
    *,
    eps=0.3,
    alpha=None,
    relative=False,
    from_start=False,
    box=False,
):
    """Independently of DAT: the FOSC (or relative FOSC) at PGD's k-th point, centred at x0
    or at the random start, from a PGD of k steps and one more gradient."""
    pgd = PGD(eps=eps, alpha=alpha, steps=max(k, 1), random_start=True)
    res = pgd(model, x, y, generator=torch.Generator().manual_seed(seed))
    point = res.x_start if k == 0 else res.x_adv
    grad, _, _ = input_gradient(model.eval(), point, y, objective("ce"))
    centre = res.x_start if from_start else x
    measure = relative_fosc if relative else fosc
    return measure(point, centre, grad, eps, "linf", (0.0, 1.0) if box else None)


@pytest.mark.parametrize(
    "options",
    [{}, {"fosc_from_random_start": True}, {"first_step_always": True, "fosc_relative": True},
     {"dat_min_steps": 2, "fosc_box": True}, {"dat_min_steps": 1, "c_max_quantile": 0.3}],
)  # fmt: skip
def test_first_batches_measures_fosc_where_and_as_the_rule_checks_it(options, digits):
    """The drop-in API: one calibration batch is full PGD-K (no stopping rule), and c_max is
    the quantile of the FOSC at the rule's first check, centred, scaled and bounded as the
    rule has it; the line that says so is what after_batch returns (the step's note)."""
    x, y = digits
    model = fresh_model().eval()
    dat = DAT(small_run(method="dat", c_max_calibration="first-batches", calibration_batches=1,
                        **options))  # fmt: skip
    assert dat.attack(0.0).stop is None and math.isnan(dat.fosc_target(0.0))
    result = dat.make_batch(model, x, y, 0.0, torch.Generator().manual_seed(9))
    assert result.steps.tolist() == [3] * len(y) and result.grad_evals == 3 * len(y)
    line = dat.after_batch(result)
    c = dat.config
    expected = _fosc_at(model, x, y, dat.min_steps, 9, relative=c.fosc_relative,
                        from_start=c.fosc_from_random_start, box=c.fosc_box)  # fmt: skip
    q = c.c_max_quantile
    assert dat.c_max == pytest.approx(float(torch.quantile(expected.double(), q)), rel=1e-5)
    assert f"c_max auto = {dat.c_max:.4g}" in line and "would have stopped there" in line
    assert dat.after_batch(result) is None and isinstance(dat.attack(0.0).stop, FoscThreshold)
    assert dat.state() == {"c_max": dat.c_max}


def test_first_batches_spans_batches_and_its_state_resumes_it(digits):
    """Calibration over 3 batches; a method restored from the state after batch 2 reaches the
    same c_max as the uninterrupted one."""
    x, y = digits
    model = fresh_model().eval()
    config = small_run(method="dat", c_max_calibration="first-batches", calibration_batches=3)
    whole, cut = DAT(config), DAT(config)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in (0, 32, 64)]

    def measure(dat, i):
        dat.after_batch(dat.make_batch(model, *batches[i], 0.0, torch.Generator().manual_seed(i)))

    for i in range(3):
        measure(whole, i)
        if i < 2:
            measure(cut, i)
        assert (whole.c_max is None) == (i < 2)
    state = json.loads(json.dumps(cut.state()))
    assert state["c_max"] is None and state["batches"] == 2 and len(state["measured"]) == 64
    resumed = DAT(config)
    resumed.load_state(state)
    measure(resumed, 2)
    assert resumed.c_max == whole.c_max
    assert whole.c_max == pytest.approx(float(torch.quantile(
        torch.cat([_fosc_at(model, xb, yb, 0, i) for i, (xb, yb) in enumerate(batches)]).double(),
        0.5)), rel=1e-5)  # fmt: skip


# ------------------------------------------------ nothing outside methods.py asks which method runs


SRC = Path(methods.__file__).resolve().parent
# the options only one method reads (Config's help says whose): nothing outside methods.py reads
# them as attributes
OWN_OPTIONS = frozenset(
    {
        "c_max", "c_max_quantile", "c_max_calibration", "calibration_batches", "c_schedule",
        "c_mode", "fosc_relative", "dat_min_steps", "fosc_from_random_start", "loss_weighting",
        "first_step_always", "late_steps", "late_from", "fat_tau", "fat_tau_max", "trades_beta",
        "fast_alpha",
    }
)  # fmt: skip
METHOD_BLIND = ["train.py", "config.py", "trainer.py", "experiments.py", "commands/*.py"]


def _asks_which_method(tree: ast.AST) -> list[tuple[int, str]]:
    """Where the code compares with a method's name, checks a method's class, or reads an
    option that only one method reads."""
    names, classes = set(METHODS), {cls.__name__ for cls in METHODS.values()}

    def names_a_method(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(
            names_a_method(e) for e in node.elts
        )

    def asks(node: ast.AST) -> bool:
        if isinstance(node, ast.Compare):
            return any(names_a_method(n) for n in (node.left, *node.comparators))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("isinstance", "issubclass"):
            return any(isinstance(n, ast.Name) and n.id in classes for n in ast.walk(node.args[1]))
        if isinstance(node, ast.Attribute):
            return node.attr in OWN_OPTIONS
        return isinstance(node, ast.Match)

    return [(n.lineno, ast.unparse(n)) for n in ast.walk(tree) if asks(n)]


def test_the_loop_the_run_the_config_and_the_cli_never_ask_which_method_runs():
    """The training loop, the run, the configuration, the command line and the experiments
    meet every method through its hooks: no comparison with a method's name, no isinstance
    of a method class, no read of one method's own option."""
    files = [p for pattern in METHOD_BLIND for p in sorted(SRC.glob(pattern))]
    assert len(files) > len(METHOD_BLIND)
    found = {
        str(path.relative_to(SRC)): hits
        for path in files
        if (hits := _asks_which_method(ast.parse(path.read_text(), str(path))))
    }
    assert found == {}


def test_the_method_blind_check_catches_what_it_looks_for():
    caught = [
        'if config.method == "dat": pass',
        'x = c.method in ("madry", "cat")',
        "if isinstance(m, DAT): pass",
        'if config.c_max_calibration == "first-batches": pass',
        "match config.method:\n    case _: pass",
    ]
    for code in caught:
        assert _asks_which_method(ast.parse(code)), code
    assert _asks_which_method(ast.parse('f"{cfg.method} on {cfg.dataset}"')) == []


# --------------------------------------------------------------------------- DAT on TRADES


def _dat_trades_and_trades(**dat_options):
    """DAT-TRADES with `dat_options` and TRADES on the same attack (PGD-5 of eps/2)."""
    dat = resolve(overrides={"method": "dat-trades", **dat_options})
    trades = resolve(overrides={"method": "trades", "steps": dat.steps, "alpha": dat.alpha})
    return create_method(dat), create_method(trades)


def test_dat_trades_past_t_prime_is_trades(digits):
    """From T' on the target is 0: every sample runs all its steps, so DAT-TRADES builds
    TRADES's batch (PGD on the KL term from the clean prediction) and trains on TRADES's loss,
    bit for bit."""
    x, y = digits
    dat, trades = _dat_trades_and_trades()
    t = float(dat.config.schedule_epochs)
    # a fresh model each: the training forward moves BatchNorm's running statistics
    a = dat.step(paper_mnist_cnn(), x, y, t, torch.Generator().manual_seed(3))
    b = trades.step(paper_mnist_cnn(), x, y, t, torch.Generator().manual_seed(3))
    assert torch.equal(a.result.x_adv, b.result.x_adv)
    assert torch.equal(a.losses, b.losses)
    assert a.result.steps.min().item() == dat.config.steps == 5
    assert dat.passes == trades.passes == 2


def test_dat_trades_stops_on_the_fosc_of_the_kl_objective(digits):
    """At t = 0 the target is the batch's median FOSC of the KL objective at the first check:
    about half the samples stop there, and each stopped sample's KL-FOSC meets the target."""
    x, y = digits
    model = paper_mnist_cnn()
    dat, _ = _dat_trades_and_trades()
    assert dat.attack(0.0).loss == "kl"
    step = dat.step(model, x, y, 0.0, torch.Generator().manual_seed(3))
    first = step.result.fosc_trace[dat.min_steps]
    stopped = step.result.steps == dat.min_steps  # stopped at the first check
    assert 0.3 < stopped.float().mean().item() < 0.7
    assert (first[stopped] <= torch.quantile(first, 0.5) + 1e-6).all()
    assert step.result.steps.float().mean().item() < 5


def test_dat_trades_refuses_an_absolute_target():
    with pytest.raises(UserError, match="batch-quantile target only"):
        resolve(overrides={"method": "dat-trades", "c_max": 0.3})
    assert resolve(overrides={"method": "dat-trades"}).c_mode == "quantile"


# ------------------------------------------------------------- APGD as the inner optimizer


def test_apgd_inner_optimizer_builds_apgd_with_the_methods_rules(digits):
    """--inner-optimizer apgd: every PGD-based method attacks with APGD (first step 2 eps,
    DAT's 5 steps and target unchanged); at t = 0 DAT's rule stops about half
    the batch at its first check, every stopped sample's FOSC within the target, and the
    others return APGD's best point after 5 steps and 6 evaluations."""
    x, y = digits
    dat = create_method(resolve(overrides={"inner_optimizer": "apgd"}))
    attack = dat.attack(0.0)
    assert type(attack) is APGD and attack.step_size == pytest.approx(0.6)
    assert attack.steps == 5 and isinstance(attack.stop, BatchQuantile)
    # APGD's step is its own schedule: neither --alpha nor a preset's PGD step moves it
    given = resolve(overrides={"inner_optimizer": "apgd", "alpha": 0.2})
    assert create_method(given).attack(0.0).step_size == pytest.approx(0.6)
    paper = resolve("mnist-paper", overrides={"inner_optimizer": "apgd"})
    assert paper.alpha == 0.075 and create_method(paper).attack(0.0).step_size == 0.6
    madry = create_method(resolve(overrides={"method": "madry", "inner_optimizer": "apgd"}))
    assert type(madry.attack(0.0)) is APGD and madry.attack(0.0).steps == 10
    step = dat.step(paper_mnist_cnn(), x, y, 0.0, torch.Generator().manual_seed(3))
    first = step.result.fosc_trace[dat.min_steps]
    at_first = step.result.steps == dat.min_steps
    assert 0.3 < at_first.float().mean().item() < 0.7
    stopped = step.result.stopped
    assert (step.result.fosc[stopped] <= torch.quantile(first, 0.5) + 1e-6).all()
    assert (step.result.steps[~stopped] == 5).all()
    evaluated = int((step.result.steps + 1).sum())  # stopped at step k: k + 1 evaluations
    # compaction pads a running set of under 16 rows to 16 (attacks.engine._pad_rows)
    assert evaluated <= step.result.grad_evals <= evaluated + 16 * 6


def test_apgd_inner_optimizer_is_refused_where_it_cannot_apply(capsys):
    with pytest.raises(UserError, match="does not apply"):
        resolve(overrides={"method": "fast", "inner_optimizer": "apgd"})
    with pytest.raises(UserError, match="inner optimizer"):
        resolve(overrides={"inner_optimizer": "momentum"})
    pgd = resolve(overrides={})
    assert pgd.hash() == Config.stored({k: v for k, v in pgd.to_dict().items()
                                        if k != "inner_optimizer"}).hash()  # fmt: skip
