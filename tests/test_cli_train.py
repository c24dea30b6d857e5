"""`fosc train`: print-config (DAT's options among the flags), a tiny real run, and bad input
answered with one line on stderr and exit status 2 (version and help: test_cli.py)."""

from __future__ import annotations

import json
import sys

import pytest

from fosctrain.cli import main

TINY = [
    "--train-n", "64", "--epochs", "1", "--batch-size", "32", "--steps", "2",
    "--val-n", "32", "--final-eval-n", "32", "--eval-steps", "2",
    "--threads", "1", "--no-progress",
]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fosc: error:")
    return err[0]


def test_print_config_resolves_preset_and_overrides(capsys):
    assert (
        main(
            [
                "train",
                "--preset",
                "mnist-paper",
                "--lr",
                "0.05",
                "--data-dir",
                "d",
                "--print-config",
            ]
        )
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["epochs"], cfg["lr"], cfg["lr_milestones"], cfg["dataset"]) == (
        50,
        0.05,
        [20, 40],
        "mnist",
    )


def test_tiny_training_run_prints_accuracies(tmp_path, capsys):
    code = main(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r", "--c-max", "auto"])
    assert code == 0
    out = capsys.readouterr().out
    assert "clean accuracy:" in out and "on the 32 test examples" in out
    assert "PGD-2 accuracy:" in out and "gradient evaluations" in out
    assert "c_max" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final"]["epoch"] == 1


def test_default_run_names_never_collide(tmp_path, capsys):
    for _ in range(2):
        assert main(["train", *TINY, "--method", "natural", "--runs-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--method", "bogus", "--print-config"], "unknown method"),
        (["train", "--eps", "-1", "--print-config"], "eps must be"),
        (["train", "--eps", "nan", "--print-config"], "eps must be"),
        (["train", "--steps", "0", "--print-config"], "steps must be"),
        (["train", "--c-max", "-2", "--print-config"], "c_max must be"),
        (["train", "--c-max", "lots", "--print-config"], "invalid _c_max value"),
        (["train", "--preset", "imagenet", "--print-config"], "invalid choice"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["train", "--config", "/nonexistent.toml", "--print-config"], "cannot read config"),
        (["train", "--resume", "/nonexistent/run"], "nothing to resume"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in one_error_line(capsys)


def test_existing_run_dir_is_refused_and_kept(tmp_path, capsys):
    args = ["train", *TINY, "--method", "natural", "--runs-dir", str(tmp_path), "--name", "r"]
    assert main(args) == 0
    before = (tmp_path / "r" / "metrics.csv").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in one_error_line(capsys)
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_resume_of_finished_run_and_mismatched_options(tmp_path, capsys):
    args = ["train", *TINY, "--method", "natural", "--runs-dir", str(tmp_path), "--name", "r"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "clean accuracy" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "r"), "--model", "cifar-cnn8"]) == 2
    assert "different configuration" in one_error_line(capsys)


def test_a_missing_attack_backend_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` fails
    run = tmp_path / "r"
    assert main(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]) == 2
    line = one_error_line(capsys)
    assert "pip install --no-deps torchattacks" in line and "--val-attack pgd" in line
    assert not run.exists()  # refused before the run directory was made
    for given in (["--test-attack", "none"], ["--val-attack", "pgd"]):
        assert main(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "p",
                     *given]) == 2  # fmt: skip
    assert main(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "p",
                 "--test-attack", "none", "--val-attack", "pgd"]) == 0  # fmt: skip


def test_the_closing_lines_lead_with_the_strong_attack_on_the_same_digits(tmp_path, capsys):
    pytest.importorskip("torchattacks")
    assert main(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("robust accuracy:") and "APGD-CE + APGD-T" in lines[1]
    assert all("on the 32 test examples" in line for line in lines[1:4])
    whole = json.loads((tmp_path / "r" / "summary.json").read_text())
    summary = whole["test"]
    assert summary["worst_acc"] <= min(summary["strong_acc"], summary["robust_acc"])
    assert summary["strong_acc"] <= summary["clean_acc"]
    # where the wall-clock went: training, the validation of every epoch, the test report
    metrics = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert whole["val_time_s"] == pytest.approx(sum(r["val_time_s"] for r in metrics))
    assert all(r["val_time_s"] > 0 for r in metrics) and summary["time_s"] > 0
    seconds = [line for line in lines if line.startswith("seconds:")]
    assert seconds == [
        f"seconds:              {whole['time_s']:.0f} training, {whole['val_time_s']:.0f} "
        f"validation, {summary['time_s']:.0f} test report"
    ]


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
