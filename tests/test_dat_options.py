"""DAT's options beyond Algorithm 1 (issue 13): --c-max auto measured on the initial model
(the default) or on the first training batches at the rule's first check, target schedules
(cosine, dat_min_steps, a batch-quantile target) and the scale-free relative FOSC."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import small_run
from safetensors.torch import load_file
from torch import nn

from fosctrain import train as train_mod
from fosctrain import trainer as trainer_mod
from fosctrain.attacks import PGD, PGDL2, BatchQuantile, FoscThreshold
from fosctrain.cli import main
from fosctrain.config import Config
from fosctrain.data import load_mnist5k
from fosctrain.errors import UserError
from fosctrain.fosc import fosc, fosc_half_range, point_fosc, relative_fosc
from fosctrain.losses import OBJECTIVES, cross_entropy, input_gradient, objective
from fosctrain.methods import DAT, create_method
from fosctrain.models import create_model
from fosctrain.rundir import build_model
from fosctrain.schedules import decay, fosc_target

small = small_run


@pytest.fixture(scope="module")
def digits():
    data = load_mnist5k()
    return data.x_train[:96], data.y_train[:96]


def fresh_model(seed: int = 0) -> nn.Module:
    """The default model as training starts: initial weights, BatchNorm at mean 0, var 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("mnist-cnn")


# --------------------------------------------------------------------------- schedules


def test_decay_and_fosc_target_match_hand_values():
    assert [decay(t, 100) for t in (0, 25, 50, 100, 150)] == pytest.approx([1, 0.75, 0.5, 0, 0])
    # (1 + cos(pi t / T')) / 2: 1, (1 + 1/sqrt 2) / 2, 1/2, (1 - 1/sqrt 2) / 2, 0, 0
    cosine = [decay(t, 100, "cosine") for t in (0, 25, 50, 75, 100, 150)]
    assert cosine == pytest.approx([1, 0.8535533906, 0.5, 0.1464466094, 0, 0])
    assert fosc_target(25, 0.5, 100, "cosine") == pytest.approx(0.4267766953)
    assert fosc_target(25, 0.5, 100) == pytest.approx(0.375)  # Algorithm 1's linear decay
    assert fosc_target(10, 0.5, 8) == 0  # a shorter T': 0 from T' on
    with pytest.raises(ValueError):
        decay(1, 10, "step")


def test_quantile_mode_builds_a_batch_quantile_rule_that_decays():
    m = create_method(small(method="dat", c_mode="quantile", c_max_quantile=0.4, t_prime=4))
    assert [m.attack(t).stop.q for t in (0, 1, 2, 4, 5)] == pytest.approx([0.4, 0.3, 0.2, 0, 0])
    assert isinstance(m.attack(0).stop, BatchQuantile) and math.isnan(m.fosc_target(0))
    cos = create_method(small(method="dat", c_schedule="cosine", c_max=0.8, t_prime=4))
    assert [cos.fosc_target(t) for t in (0, 2, 4)] == pytest.approx([0.8, 0.4, 0])


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, 0), ({"first_step_always": True}, 1), ({"dat_min_steps": 2}, 2),
     ({"dat_min_steps": 2, "first_step_always": True}, 2)],
)  # fmt: skip
def test_the_rule_is_first_checked_at_dat_min_steps(options, expected, digits):
    m = create_method(small(method="dat", c_max=1e9, **options))
    pgd = m.attack(0.0)
    assert pgd.min_steps == expected
    x, y = digits
    result = pgd(fresh_model().eval(), x[:32], y[:32], generator=torch.Generator().manual_seed(0))
    assert result.steps.tolist() == [expected] * 32  # a huge target stops all at the floor


# --------------------------------------------------------------------------- relative FOSC


def _numpy_relative(x, x0, g, eps, norm, bounds=None):
    x, x0, g = (t.double().flatten(1).numpy() for t in (x, x0, g))
    if bounds is not None:
        lo, hi = np.maximum(x0 - eps, bounds[0]), np.minimum(x0 + eps, bounds[1])
        c = np.where(g > 0, g * (hi - x), g * (lo - x)).sum(1)
        half = 0.5 * (np.abs(g) * (hi - lo)).sum(1)
    else:
        radius = np.abs(g).sum(1) if norm == "linf" else np.linalg.norm(g, axis=1)
        c = eps * radius - ((x - x0) * g).sum(1)
        half = eps * radius
    return c / half


@pytest.mark.parametrize(("norm", "box"), [("linf", False), ("linf", True), ("l2", False)])
def test_relative_fosc_matches_numpy_and_lies_in_0_2(norm, box):
    gen = torch.Generator().manual_seed(0)
    eps = 0.3 if norm == "linf" else 1.5
    x0 = torch.rand(40, 1, 6, 6, generator=gen)
    x = x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps
    if norm == "l2":
        d = (x - x0).flatten(1)
        x = x0 + (d * (eps / d.norm(dim=1, keepdim=True)).clamp(max=1)).view_as(x0)
    bounds = (0.0, 1.0) if box else None
    if box:
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
    g = torch.randn(x0.shape, generator=gen)
    rel = relative_fosc(x, x0, g, eps, norm, bounds)
    expected = _numpy_relative(x, x0, g, eps, norm, bounds)
    np.testing.assert_allclose(rel.double().numpy(), expected, rtol=1e-5)
    assert float(rel.min()) >= 0 and float(rel.max()) <= 2 + 1e-6
    at_center = relative_fosc(x0, x0, g, eps, norm, None if box else bounds)
    torch.testing.assert_close(at_center, torch.ones(40))  # 1 at x0 (paper form, L2)


def test_relative_fosc_brute_force_on_tiny_boxes_and_circles():
    """L-inf box: FOSC and the linearized loss's range by enumerating the box's 2^3 vertices;
    L2 in 2-d: by a dense sweep of the circle."""
    gen = torch.Generator().manual_seed(1)
    eps = 0.4
    for _ in range(20):
        x0 = torch.rand(1, 3, generator=gen)
        lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
        x = lo + torch.rand(1, 3, generator=gen) * (hi - lo)
        g = torch.randn(1, 3, generator=gen)
        values = [
            float((torch.where(torch.tensor(corner), hi, lo) * g).sum())
            for corner in itertools.product([False, True], repeat=3)
        ]
        c = max(values) - float((x * g).sum())
        expected = c / ((max(values) - min(values)) / 2)
        got = relative_fosc(x, x0, g, eps, "linf", (0.0, 1.0))
        assert float(got) == pytest.approx(expected, rel=1e-5)
    angles = torch.linspace(0, 2 * math.pi, 200001, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()], 1)
    for _ in range(10):
        x0, g = torch.randn(1, 2, generator=gen).double(), torch.randn(1, 2, generator=gen).double()
        x = x0 + torch.randn(1, 2, generator=gen).double().clamp(-0.5, 0.5) * eps
        linear = ((x0 + eps * circle) * g).sum(1)
        c = float(linear.max()) - float((x * g).sum())
        expected = c / (float(linear.max() - linear.min()) / 2)
        assert float(relative_fosc(x, x0, g, eps, "l2")) == pytest.approx(expected, rel=1e-6)


def test_relative_fosc_is_free_of_the_gradients_scale():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(16, 1, 5, 5, generator=gen)
    x = (x0 + (torch.rand(x0.shape, generator=gen) - 0.5) * 0.5).clamp(0, 1)
    g = torch.randn(x0.shape, generator=gen)
    for norm, bounds in (("linf", None), ("linf", (0.0, 1.0)), ("l2", None)):
        base = relative_fosc(x, x0, g, 0.3, norm, bounds)
        for k in (1e-4, 0.37, 3.0, 2.0**7, 1e5):
            torch.testing.assert_close(relative_fosc(x, x0, k * g, 0.3, norm, bounds), base)
            assert not torch.allclose(fosc(x, x0, k * g, 0.3, norm, bounds), base)
    zero = relative_fosc(x, x0, torch.zeros_like(g), 0.3)
    assert zero.tolist() == [0.0] * 16  # g = 0: stationary, not NaN
    assert fosc_half_range(x0, g, 0.3).tolist() == pytest.approx(
        (0.3 * g.flatten(1).abs().sum(1)).tolist()
    )


def test_engine_reports_relative_fosc_when_asked(digits):
    x, y = digits
    model = fresh_model().eval()
    res = PGD(eps=0.3, steps=1, fosc_relative=True)(model, x[:16], y[:16], generator=None)
    grad = torch.autograd.grad(cross_entropy(model(res.x_start.requires_grad_()), y[:16]).sum(),
                               res.x_start)[0]  # fmt: skip
    expected = relative_fosc(res.x_start.detach(), x[:16], grad, 0.3)
    torch.testing.assert_close(res.fosc_trace[0], expected, rtol=1e-4, atol=1e-6)


def _between_middle_values(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: no sample sits on it, so rounding
    (the objective scaled by k) cannot flip a comparison."""
    v = values.sort().values
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


@pytest.mark.parametrize("cls", [PGD, PGDL2])
def test_relative_rule_stops_the_same_samples_when_the_objective_is_scaled(
    cls, digits, monkeypatch
):
    """The attack objective times k (a test-only objective): with the relative rule the same
    samples stop at the same steps at the same points; with the absolute rule they do not."""
    x, y = digits
    model = fresh_model().eval()
    eps = 0.3 if cls is PGD else 2.0

    def run(k: float, relative: bool, threshold: float):
        monkeypatch.setitem(OBJECTIVES, "scaled", lambda z, t: k * cross_entropy(z, t))
        stop = FoscThreshold(threshold)
        pgd = cls(eps=eps, steps=6, loss="scaled", fosc_relative=relative, stop=stop)
        return pgd(model, x[:48], y[:48], generator=torch.Generator().manual_seed(3))

    free = cls(eps=eps, steps=6, fosc_relative=True)(
        model, x[:48], y[:48], generator=torch.Generator().manual_seed(3)
    )
    middle = _between_middle_values(free.fosc_trace.amin(0))  # about half stop, at any step
    base = run(1.0, True, middle)
    assert 0 < int(base.stopped.sum()) < 48
    # Powers of 2 scale every float exactly; other k change the last bits, which L2's
    # normalized steps carry into maxpool ties (L-inf's sign steps do not).
    for k in (2.0**-6, 2.0**9) if cls is PGDL2 else (2.0**-6, 0.3, 7.0, 2.0**9):
        scaled = run(k, True, middle)
        assert scaled.steps.tolist() == base.steps.tolist()
        assert torch.equal(scaled.stopped, base.stopped)
        torch.testing.assert_close(scaled.x_adv, base.x_adv)
    absolute = _between_middle_values(run(1.0, False, 0.0).fosc_trace.amin(0))
    plain, big = run(1.0, False, absolute), run(2.0**9, False, absolute)
    assert plain.steps.tolist() != big.steps.tolist()  # the absolute target is not scale-free


# --------------------------------------------------------------------------- batch quantile


@pytest.mark.parametrize(("q", "min_steps"), [(0.3, 0), (0.6, 1), (0.5, 2)])
def test_batch_quantile_rule_is_the_same_compacted_or_not(q, min_steps, digits):
    x, y = digits
    model = fresh_model().eval()
    results = []
    for compact in (True, False):
        rule = BatchQuantile(q)
        pgd = PGD(eps=0.3, steps=6, stop=rule, min_steps=min_steps, compact=compact)
        res = pgd(model, x[:40], y[:40], generator=torch.Generator().manual_seed(4))
        first = res.fosc_trace[min_steps].double()
        assert rule.threshold == pytest.approx(float(torch.quantile(first, q)))
        assert (res.steps[res.stopped] >= min_steps).all()
        results.append((res, rule.threshold))
    (a, ta), (b, tb) = results
    assert ta == tb
    assert a.steps.tolist() == b.steps.tolist()
    assert torch.equal(a.x_adv, b.x_adv)
    assert len(set(a.steps.tolist())) > 1  # samples left at different steps: compaction ran


def test_batch_quantile_zero_is_full_pgd(digits):
    x, y = digits
    rule = BatchQuantile(0.0)
    res = PGD(eps=0.3, steps=3, stop=rule)(fresh_model().eval(), x[:16], y[:16])
    assert rule.threshold == 0 and res.steps.tolist() == [3] * 16


# --------------------------------------------------------------------------- calibration


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
    dat = DAT(small(method="dat", c_max_calibration="first-batches", calibration_batches=1,
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
    config = small(method="dat", c_max_calibration="first-batches", calibration_batches=3)
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


def test_first_batches_trains_as_madry_while_it_measures(tmp_path, capsys):
    """An epoch of calibration batches is Madry's epoch: the same loss, accuracy, FOSC and
    evaluations; then DAT's rule is on (c_t from c_max). The log names c_max and the share
    of examples that would have stopped."""
    runs = {}
    for method, extra in (("madry", {}), ("dat", {"c_max_calibration": "first-batches",
                                                  "calibration_batches": 2})):  # fmt: skip
        cfg = small(method=method, epochs=2, **extra)
        train_mod.train(cfg, tmp_path / method, progress=True)
        runs[method] = _rows(tmp_path / method)
    err = capsys.readouterr().err
    madry, dat = runs["madry"], runs["dat"]
    assert dat[0]["grad_evals"] == madry[0]["grad_evals"] == 96 * 4
    for key in ("train_loss", "val_robust_acc", "fosc_mean", "steps_mean"):
        assert dat[0][key] == madry[0][key], key
    assert dat[0]["stopped_frac"] == 0
    assert dat[1]["fosc_target"] == pytest.approx(dat[1]["c_max"] / 2)  # t = 1 of T' = 2
    assert f"c_max auto = {dat[1]['c_max']:.4g}" in err and "would have stopped there" in err


def _stop_after(monkeypatch, n: int):
    real = train_mod.train_batch
    calls = {"n": 0}

    def stop(tr, *a, **k):
        out = real(tr, *a, **k)
        calls["n"] += 1
        if calls["n"] == n:
            tr.stop_requested = True
        return out

    monkeypatch.setattr(train_mod, "train_batch", stop)
    return real


@pytest.mark.parametrize("cut_after", [1, 3])  # mid-calibration, after it
def test_run_resumed_mid_or_after_first_batches_equals_uninterrupted(tmp_path, monkeypatch,
                                                                     cut_after):  # fmt: skip
    cfg = small(method="dat", epochs=3, c_max_calibration="first-batches", calibration_batches=2,
                t_prime=3)  # fmt: skip
    whole = train_mod.train(cfg, tmp_path / "whole", progress=False)
    real = _stop_after(monkeypatch, cut_after)
    with pytest.raises(train_mod.Interrupted):
        train_mod.train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_mod, "train_batch", real)
    resumed = train_mod.train(cfg, tmp_path / "cut", resume=True, progress=False)
    a = load_file(str(tmp_path / "whole" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["c_max"] == resumed["c_max"] and whole["grad_evals"] == resumed["grad_evals"]
    untimed = [
        [{k: v for k, v in row.items() if not k.endswith("time_s")} for row in _rows(d)]
        for d in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert untimed[0] == untimed[1]


def test_first_batches_is_refused_data_parallel():
    cfg = small(method="dat", c_max_calibration="first-batches")
    dist = SimpleNamespace(enabled=True, world=2, device=torch.device("cpu"))
    with pytest.raises(UserError, match="one process only"):
        trainer_mod.check_world(cfg, dist, 96)
    trainer_mod.check_world(small(method="dat"), dist, 96)  # initial: fine


def test_point_fosc_is_half_the_relative_fosc_and_nan_at_zero_gradient():
    """One meaning: point_fosc's relative value is relative_fosc / 2 (in [0, 1]), box-exact as
    asked (downgraded for L2, see box_exact), NaN where relative_fosc says 0 (no gradient)."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 1, 5, 5, generator=gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 3))
    y = torch.zeros(8, dtype=torch.long)
    x = (x0 + 0.1).clamp(0, 1)
    grad, _, _ = input_gradient(model, x, y, objective("ce"))
    for norm, box in (("linf", False), ("linf", True), ("l2", False), ("l2", True)):
        bounds = (0.0, 1.0) if box and norm == "linf" else None
        c, rel = point_fosc(model, x0, x, y, 0.3, norm=norm, fosc_box=box)
        torch.testing.assert_close(c, fosc(x, x0, grad, 0.3, norm, bounds), rtol=0, atol=0)
        half = relative_fosc(x, x0, grad, 0.3, norm, bounds) / 2
        torch.testing.assert_close(rel, half, rtol=0, atol=0)
    zero = nn.Sequential(nn.Flatten(), nn.Linear(25, 3))
    nn.init.zeros_(zero[1].weight)
    _, rel0 = point_fosc(zero, x0, x, y, 0.3)
    assert torch.isnan(rel0).all()


# --------------------------------------------------------------------------- options, runs


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
        small(method="dat", **options)


def test_dat_options_are_command_line_flags(capsys):
    argv = ["train", "--c-schedule", "cosine", "--c-mode", "quantile", "--fosc-relative",
            "--dat-min-steps", "2", "--c-max-quantile", "0.3", "--c-max-calibration",
            "first-batches", "--calibration-batches", "4", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    config = json.loads(out[out.index("{") :])
    assert config["c_schedule"] == "cosine" and config["c_mode"] == "quantile"
    assert config["fosc_relative"] is True and config["dat_min_steps"] == 2
    assert config["c_max_calibration"] == "first-batches" and config["calibration_batches"] == 4


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_stopped_frac_is_logged_for_every_attacking_method(tmp_path):
    train_mod.train(small(method="madry", epochs=1), tmp_path / "m", progress=False)
    assert _rows(tmp_path / "m")[0]["stopped_frac"] == 0
    train_mod.train(small(method="dat", epochs=1, c_max=1e9), tmp_path / "d", progress=False)
    assert _rows(tmp_path / "d")[0]["stopped_frac"] == 1
    train_mod.train(small(method="natural", epochs=1), tmp_path / "n", progress=False)
    assert _rows(tmp_path / "n")[0]["stopped_frac"] is None  # NaN: no attack


@pytest.mark.parametrize("calibration", ["initial", "first-batches"])
def test_quantile_mode_trains_without_calibration(tmp_path, capsys, calibration):
    cfg = small(method="dat", c_mode="quantile", dat_min_steps=1, t_prime=1,
                c_max_calibration=calibration)  # fmt: skip
    summary = train_mod.train(cfg, tmp_path / "q", progress=True)
    assert "c_max auto" not in capsys.readouterr().err
    rows = _rows(tmp_path / "q")
    assert [r["fosc_target"] for r in rows] == [None, None]  # NaN: each batch has its own
    assert 1 <= rows[0]["steps_mean"] < 3 and 0 < rows[0]["stopped_frac"] < 1
    assert rows[1]["steps_mean"] == 3  # q = 0: full PGD
    assert summary["c_max"] is None


def test_c_max_auto_is_logged_with_where_it_was_measured(tmp_path, capsys):
    cfg = small(method="dat", epochs=1, first_step_always=True, c_max="auto")
    summary = train_mod.train(cfg, tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert f"c_max auto = {summary['c_max']:.4g}" in err and "step-1 FOSC" in err
    assert "stopped early" in err


def _warmed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The same weights with BatchNorm's running statistics set to the data's (as after the
    first epoch's forward passes), not the fresh mean 0 / var 1."""
    warm = create_model("mnist-cnn")
    warm.load_state_dict(model.state_dict())
    for m in warm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes below
    warm.train()
    with torch.no_grad():
        warm(x)
    return warm.eval()


def test_batch_quantile_target_is_free_of_batchnorm_statistics(digits):
    """Fresh BatchNorm statistics change the FOSC the rule reads several-fold, and with it an
    absolute c_max measured on them; the batch-quantile target stops the same share of every
    batch at the first check whatever the statistics (issue 13: fresh BN must not skew it)."""
    x, y = digits
    fresh = fresh_model().eval()
    warm = _warmed(fresh, x)
    medians, shares = [], []
    for model in (fresh, warm):
        rule = BatchQuantile(0.5)
        res = PGD(eps=0.3, steps=4, stop=rule, min_steps=1)(
            model, x, y, generator=torch.Generator().manual_seed(2)
        )
        medians.append(float(res.fosc_trace[1].median()))
        shares.append(float((res.steps == 1).double().mean()))
    assert max(medians) / min(medians) > 3  # what an absolute c_max would be calibrated on
    assert shares == [pytest.approx(0.5, abs=1 / len(y))] * 2
