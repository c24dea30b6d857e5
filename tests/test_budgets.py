"""Time to robustness (issue 19): checkpoints kept at fixed gradient-evaluation budgets while
training (train.keep_budgets), scored on fixed test digits (reproduce.score_budgets), their
tables (fosctrain.budgets) and the experiment that runs them (`fosc reproduce
time-to-robustness`)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from conftest import small_run, stop_after
from safetensors.torch import load_file

from fosctrain import aggregate, figures
from fosctrain import train as train_mod
from fosctrain.budgets import at_seconds, collect_budgets, curve, read_scores, summarize_budgets
from fosctrain.checkpoint import MODEL_PREFIX
from fosctrain.cli import main
from fosctrain.errors import UserError
from fosctrain.estimate import BUDGET_GRADS, budget_grads, training_grads
from fosctrain.experiments import get_experiment, get_scale, overrides, scaled_epochs
from fosctrain.reproduce import BUDGET_SCORES, make_plan
from fosctrain.rundir import budget_name, checkpoint_name, resolve_checkpoint

EVERY = 200  # a small run of madry PGD-3 spends 4 x 48 = 192 evaluations per batch


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _weights(path):
    weights = {k: v for k, v in load_file(str(path)).items() if k.startswith(MODEL_PREFIX)}
    assert weights, path
    return weights


# --------------------------------------------------------------------------- training


def test_budget_checkpoints_land_within_one_batch_past_each_budget(tmp_path):
    summary = train_mod.train(small_run(method="madry", budget_every=EVERY), tmp_path / "r",
                              progress=False)  # fmt: skip
    rows = _rows(tmp_path / "r" / "budgets.csv")
    per_batch = 48 * (3 + 1)
    assert len(rows) == summary["grad_evals"] // EVERY == 768 // 200
    for k, row in enumerate(rows, 1):
        budget, spent = int(row["budget"]), int(row["grad_evals"])
        assert budget == k * EVERY
        assert budget <= spent < budget + per_batch
        assert (tmp_path / "r" / f"{budget_name(budget)}.safetensors").is_file()
    for key in ("time_s", "cpu_s"):
        assert [float(r[key]) for r in rows] == sorted(float(r[key]) for r in rows)
        assert 0 < summary["budgets"][-1][key] <= summary[key]
    assert [r["budget"] for r in summary["budgets"]] == [int(r["budget"]) for r in rows]


def test_budgets_change_nothing_trained_and_no_config_hash(tmp_path):
    plain, kept = small_run(method="dat"), small_run(method="dat", budget_every=EVERY)
    assert plain.hash() == kept.hash()
    train_mod.train(plain, tmp_path / "plain", progress=False)
    train_mod.train(kept, tmp_path / "kept", progress=False)
    a = _weights(tmp_path / "plain" / "last.safetensors")
    b = _weights(tmp_path / "kept" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_checkpoint_holds_the_model_of_its_batch(tmp_path):
    """Budget 200 is passed by epoch 1's second (last) batch, at 384 evaluations: its
    checkpoint is the model a one-epoch run of the same seed ends with."""
    train_mod.train(small_run(method="madry", budget_every=EVERY), tmp_path / "r", progress=False)
    train_mod.train(small_run(method="madry", epochs=1), tmp_path / "one", progress=False)
    first = json.loads((tmp_path / "r" / "summary.json").read_text())["budgets"][0]
    assert (first["epoch"], first["batch"], first["grad_evals"]) == (1, 2, 384)
    kept = _weights(tmp_path / "r" / f"{budget_name(EVERY)}.safetensors")
    one = _weights(tmp_path / "one" / "last.safetensors")
    last = _weights(tmp_path / "r" / "last.safetensors")
    assert kept.keys() == one.keys()
    assert all(torch.equal(kept[k], one[k]) for k in kept)
    assert not all(torch.equal(kept[k], last[k]) for k in kept)


def test_resumed_run_keeps_the_same_budget_checkpoints(tmp_path, monkeypatch):
    cfg = small_run(method="madry", epochs=3, budget_every=EVERY)
    whole = train_mod.train(cfg, tmp_path / "whole", progress=False)
    real = stop_after(monkeypatch, 3)  # mid-epoch 2, after the first budget was kept
    with pytest.raises(train_mod.Interrupted):
        train_mod.train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_mod, "train_batch", real)
    resumed = train_mod.train(cfg, tmp_path / "cut", resume=True, progress=False)
    key = ("budget", "grad_evals", "epoch", "batch")
    assert [[b[k] for k in key] for b in whole["budgets"]] == [
        [b[k] for k in key] for b in resumed["budgets"]
    ]
    for b in whole["budgets"]:
        name = f"{budget_name(b['budget'])}.safetensors"
        x, y = _weights(tmp_path / "whole" / name), _weights(tmp_path / "cut" / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert len(_rows(tmp_path / "cut" / "budgets.csv")) == len(whole["budgets"])


def test_budget_every_must_be_a_non_negative_integer():
    with pytest.raises(UserError, match="budget_every"):
        small_run(budget_every=-1)
    with pytest.raises(UserError, match="budget_every"):
        small_run(budget_every=2.5)


# --------------------------------------------------------------------------- checkpoints by name


def test_checkpoint_names_and_no_fallback_for_a_missing_budget(tmp_path):
    assert budget_name(500_000) == "budget-000500000"
    assert [checkpoint_name(n) for n in ("best", "last", "budget-12")] == [
        "best", "last", "budget-12"]  # fmt: skip
    for bad in ("first", "budget-", "budget-x1", "../last"):
        with pytest.raises(UserError, match="--which"):
            checkpoint_name(bad)
    train_mod.train(small_run(method="natural", epochs=1), tmp_path / "r", progress=False)
    assert resolve_checkpoint(tmp_path / "r", "best")[1].name == "best.safetensors"
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "r", budget_name(100))


def test_fosc_eval_which_takes_a_budget_name(tmp_path, capsys):
    train_mod.train(small_run(method="madry", budget_every=EVERY), tmp_path / "r", progress=False)
    code = main(["eval", str(tmp_path / "r"), "--which", budget_name(EVERY), "--n", "16",
                 "--attacks", "pgd", "--apgd-targets", "2", "--no-checks", "--no-progress",
                 "--out", str(tmp_path / "e")])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["meta"]["checkpoint"].endswith(f"{budget_name(EVERY)}.safetensors")
    assert report["settings"]["apgd_targets"] == 2
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "--which", "first"]) == 2
    assert "--which must be best, last or budget-N, got 'first'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the experiment


def test_equal_budget_epochs_move_the_learning_rate_drops_with_them():
    assert scaled_epochs({"epochs": 4, "lr_milestones": [3]}, 2) == {
        "epochs": 8, "lr_milestones": [6]}  # fmt: skip
    assert scaled_epochs({"epochs": 4, "lr_milestones": [3]}, 11 / 6) == {
        "epochs": 7, "lr_milestones": [5]}  # fmt: skip
    assert scaled_epochs({"epochs": 1, "lr_milestones": [1]}, 0.2) == {
        "epochs": 1, "lr_milestones": [1]}  # fmt: skip
    exp, full = get_experiment("time-to-robustness"), get_scale("full")
    dat = overrides(exp, full, "dat")
    assert (dat["epochs"], dat["lr_milestones"], dat["t_prime"]) == (8, [6], 7)  # T' = 5T/6
    madry = overrides(exp, full, "madry-k10")
    assert (madry["epochs"], madry["steps"], madry["alpha"]) == (4, 10, pytest.approx(0.075))
    assert overrides(exp, full, "fast")["epochs"] == 22


def test_plan_runs_seed_zero_of_every_configuration_first_and_keeps_budgets():
    plan = make_plan("time-to-robustness", "smoke", "/tmp/x", seeds=2, configs=["madry-k10", "dat"])
    assert [r.name for r in plan.runs] == ["madry-k10-s0", "dat-s0", "madry-k10-s1", "dat-s1"]
    assert all(plan.config(r).budget_every == get_scale("smoke").budget_every for r in plan.runs)
    assert all(BUDGET_SCORES in r.spec.outputs() for r in plan.runs)
    frontier = make_plan("frontier", "smoke", "/tmp/y", configs=["madry-k10", "fast"])
    assert [r.name for r in frontier.runs] == ["madry-k10-s0", "fast-s0"]
    assert all(plan.config(r).budget_every == 0 for r in frontier.runs)


def test_budget_scoring_estimate_counts_every_checkpoint_and_the_last():
    plan = make_plan("time-to-robustness", "smoke", "/tmp/x", configs=["madry-k10"])
    config = plan.config(plan.runs[0])
    checkpoints = int(training_grads(config) // config.budget_every) + 1
    assert budget_grads(config, 8) == checkpoints * 8 * BUDGET_GRADS
    assert budget_grads(small_run(), 8) == 0


def test_time_to_robustness_smoke_scores_every_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "ttr"
    argv = ["reproduce", "time-to-robustness", "--scale", "smoke", "--out", str(out),
            "--configs", "madry-k10", "dat"]  # fmt: skip
    assert main(argv) == 0
    for name in ("dat-s0", "madry-k10-s0"):
        run = out / "runs" / name
        scores = read_scores(run / BUDGET_SCORES)
        kept = json.loads((run / "summary.json").read_text())["budgets"]
        assert [s["checkpoint"] for s in scores] == [
            *(budget_name(b["budget"]) for b in kept), "last"]  # fmt: skip
        main_report = json.loads((run / "eval" / "eval.json").read_text())
        assert scores[-1]["clean"] == main_report["results"][0]["clean"]["acc"]
        assert all(s["apgd"] <= s["clean"] and s["n"] == 8 for s in scores)
        assert all(s["worst"] <= min(s["apgd"], s["pgd"]) for s in scores)
    table = _rows(out / "budgets.csv")
    assert {r["config"] for r in table} == {"dat", "madry-k10"}
    text = (out / "summary.md").read_text()
    assert "## Time to robustness" in text and "Madry et al. 2018" in text and "88.43" in text
    assert (out / "time_to_robustness.png").stat().st_size > 10_000
    before = (out / "runs" / "dat-s0" / BUDGET_SCORES).stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 of 2 runs finished, 0 to run" in capsys.readouterr().err
    assert (out / "runs" / "dat-s0" / BUDGET_SCORES).stat().st_mtime_ns == before
    shutil.rmtree(out / "runs" / "dat-s0" / "eval-autoattack")  # scored, AutoAttack to come
    plan = make_plan("time-to-robustness", "smoke", out, configs=["madry-k10", "dat"])
    assert {r["config"] for r in collect_budgets(plan)} == {"dat", "madry-k10"}


def test_seconds_of_a_run_trained_on_a_gpu_stay_off_the_cpu_seconds_axis(tmp_path):
    """summary.json records the device; a run trained on a GPU keeps its evaluations and
    accuracies in the tables but not its seconds (another machine's), in budgets.csv and in
    results.csv alike."""
    out = tmp_path / "ttr"
    argv = ["reproduce", "time-to-robustness", "--scale", "smoke", "--out", str(out),
            "--configs", "madry-k10", "--seeds", "2"]  # fmt: skip
    assert main(argv) == 0
    plan = make_plan("time-to-robustness", "smoke", out, seeds=2, configs=["madry-k10"])
    path = out / "runs" / "madry-k10-s1" / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["device"] == "cpu"
    before = collect_budgets(plan)
    path.write_text(json.dumps({**summary, "device": "cuda:0 NVIDIA H200"}))
    after = collect_budgets(plan)
    assert [r["device"] for r in after] == ["cpu"] * (len(after) // 2) + [
        "cuda:0 NVIDIA H200"] * (len(after) // 2)  # fmt: skip
    for old, new in zip(before, after, strict=True):
        gpu = new["device"] != "cpu"
        assert all(math.isnan(new[k]) == gpu for k in ("time_s", "cpu_s"))
        assert {k: v for k, v in old.items() if k not in ("time_s", "cpu_s", "device")} == {
            k: v for k, v in new.items() if k not in ("time_s", "cpu_s", "device")}  # fmt: skip
    summary_rows = summarize_budgets(plan, after)
    cpu_only = [r for r in after if r["device"] == "cpu"]
    assert [e["cpu_s_mean"] for e in summary_rows] == [r["cpu_s"] for r in cpu_only]
    assert all(e["seeds"] == 2 for e in summary_rows)
    rows = {r["seed"]: r for r in aggregate.collect(plan)}
    assert math.isnan(rows[1]["train_time_s"]) and rows[1]["device"] == "cuda:0 NVIDIA H200"
    assert rows[0]["train_time_s"] > 0 and rows[0]["device"] == "cpu"


def test_print_commands_score_the_budget_checkpoints_as_reproduce_does(tmp_path, capsys):
    out = tmp_path / "ttr"
    assert main(["reproduce", "time-to-robustness", "--scale", "smoke", "--out", str(out),
                 "--configs", "madry-k10", "--print-commands"]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert "--budget-every=300" in line
    assert '--which "$w"' in line and "--apgd-targets 3" in line and "--attacks pgd" in line
    assert line.index("eval-budgets") < line.index("--autoattack standard")


# --------------------------------------------------------------------------- the tables


def _entry(config, checkpoint, seconds, apgd, lo=math.nan, hi=math.nan):
    return {"config": config, "checkpoint": checkpoint, "cpu_s_mean": seconds,
            "apgd_mean": apgd, "apgd_ci_low": lo, "apgd_ci_high": hi}  # fmt: skip


def test_at_seconds_interpolates_along_a_curve_and_not_beyond_it():
    points = [_entry("a", "budget-1", 10.0, 0.5), _entry("a", "budget-2", 30.0, 0.7),
              _entry("a", "last", 40.0, 0.9)]  # fmt: skip
    assert at_seconds(points, 10.0) == 0.5
    assert at_seconds(points, 20.0) == pytest.approx(0.6)
    assert at_seconds(points, 35.0) == pytest.approx(0.8)
    assert at_seconds(points, 40.0) == pytest.approx(0.9)
    assert math.isnan(at_seconds(points, 5.0)) and math.isnan(at_seconds(points, 41.0))
    summary = [points[2], points[0], _entry("b", "last", 1.0, 0.1), points[1]]
    assert [e["checkpoint"] for e in curve(summary, "a")] == ["budget-1", "budget-2", "last"]


def test_budget_summary_is_the_mean_and_t_interval_over_seeds():
    plan = make_plan("time-to-robustness", "smoke", "/tmp/x", seeds=3, configs=["madry-k10"])
    rows = []
    for seed, acc in enumerate((0.50, 0.54, 0.58)):
        for c, b, g, t in (
            ("budget-000000300", 300, 352, 1.0 + seed),
            ("last", math.nan, 704, 2.0),
        ):
            rows.append({"config": "madry-k10", "seed": seed, "checkpoint": c, "budget": b,
                         "grad_evals": g, "time_s": 2 * t, "cpu_s": t, "clean": 0.9, "pgd": 0.6,
                         "apgd": acc, "worst": acc})  # fmt: skip
    summary = summarize_budgets(plan, rows)
    assert [e["checkpoint"] for e in summary] == ["budget-000000300", "last"]
    first = summary[0]
    assert first["seeds"] == 3 and first["cpu_s_mean"] == pytest.approx(2.0)
    assert first["time_s_mean"] == pytest.approx(4.0)
    assert first["apgd_mean"] == pytest.approx(0.54)
    half = 4.302652729749464 * 0.04 / math.sqrt(3)  # t_{0.975, 2} x std / sqrt(n)
    assert first["apgd_ci_high"] - first["apgd_mean"] == pytest.approx(half)


def _seed_rows(config, accs):
    return [{"config": config, "seed": seed, "checkpoint": c, "budget": b, "grad_evals": g,
             "time_s": 2 * t, "cpu_s": t, "clean": 0.9, "pgd": 0.6, "apgd": a, "worst": a}
            for seed, acc in enumerate(accs)
            for c, b, g, t, a in (("budget-000000300", 300, 352, 1.0 + seed, acc / 2),
                                  ("last", math.nan, 704, 4.0, acc))]  # fmt: skip


def test_time_to_robustness_figure_draws_the_mean_and_the_range_of_the_seeds(tmp_path, monkeypatch):
    plan = make_plan("time-to-robustness", "smoke", "/tmp/x", seeds=3, configs=["dat", "madry-k10"])
    rows = _seed_rows("dat", (0.5, 0.6, 0.7)) + _seed_rows("madry-k10", (0.8,))
    figs = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: figs.append(fig) or path)
    figures.plot_time_to_robustness(summarize_budgets(plan, rows), rows, tmp_path / "t.png")
    (legend,) = figs[0].legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "dat (3 seeds, band: their range)", "madry-k10 (1 seed)"]  # fmt: skip
    for ax, xs in zip(figs[0].axes, ([2.0, 4.0], [352, 704]), strict=True):  # CPU s, evaluations
        dat, madry = ax.get_lines()
        assert list(dat.get_xdata()) == pytest.approx(xs)
        assert list(dat.get_ydata()) == pytest.approx([30.0, 60.0])
        assert list(madry.get_ydata()) == pytest.approx([40.0, 80.0])
        (band,) = ax.collections  # one band: dat's; madry's one seed has none
        ys = band.get_paths()[0].vertices[:, 1]
        assert sorted({round(float(y), 6) for y in ys}) == pytest.approx([25.0, 35.0, 50.0, 70.0])
