"""The eval, measure and plot verbs through fosctrain.cli.main on a tiny fake run directory:
files written, earlier results kept, and every kind of bad input one stderr line, exit 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST_EVAL,
    assert_one_line_error,
    one_error_line,
    run_cli,
    truncate_half,
)

from fosctrain.checkpoint import save_checkpoint
from fosctrain.cli import main
from fosctrain.files import atomic_write_json
from fosctrain.models import create_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(**over) -> dict:
    base = {
        "model": "mnist-cnn",
        "num_classes": 10,
        "model_kwargs": {},
        "dataset": "mnist5k",
        "data_dir": None,
        "eps": 0.3,
        "alpha": 0.075,
        "steps": 10,
        "norm": "linf",
        "method": "dat",
        "seed": 0,
    }
    return {**base, **over}


def make_run(root: Path, name: str = "run", **over) -> Path:
    run = root / name
    torch.manual_seed(0)
    model = create_model("mnist-cnn")
    model.eval()
    save_checkpoint(run, "best", model=model)
    save_checkpoint(run, "last", model=model)
    atomic_write_json(run / "config.json", config(**over))
    rows = [
        {
            "epoch": e,
            "train_loss": 2.0 - 0.3 * e,
            "train_acc": 0.3 + 0.1 * e,
            "test_clean_acc": 0.4 + 0.1 * e,
            "test_robust_acc": 0.1 + 0.05 * e,
            "fosc_target": 0.5 - 0.1 * e,
            "fosc_mean": 0.4 / (1 + e),
            "fosc_median": 0.3 / (1 + e),
            "fosc_p90": 0.8 / (1 + e),
            "steps_mean": 3.0 + e,
            "grad_evals": 5000 * (e + 1),
            "lr": 0.01,
            "time_s": 2.0 * (e + 1),
        }
        for e in range(4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 200 and len(data) > 5_000


# ---------------------------------------------------------------- eval


def test_eval_writes_report_and_never_overwrites(run_dir, capsys):
    assert main(["eval", str(run_dir), *FAST_EVAL, "--eps", "0.1", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "worst_case" in out and "95% CI" in out
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["n"] == 16 and report["settings"]["eps_list"] == [0.1, 0.3]
    assert report["meta"]["checkpoint"].endswith("best.safetensors")
    assert report["results"][0]["settings"]["pgd"]["steps"] == 2
    lines = (run_dir / "eval" / "eval.csv").read_text().splitlines()
    assert lines[0] == "eps,attack,acc,ci_low,ci_high,correct,n"
    names = [line.split(",")[1] for line in lines[1:9]]
    assert names == [
        "clean",
        "fgsm",
        "pgd",
        "cw",
        "apgd-ce+t/apgd-ce",
        "apgd-ce+t/apgd-t",
        "apgd-ce+t",
        "worst_case",
    ]
    assert len(lines) == 1 + 2 * 8
    assert not (run_dir / "eval" / ".resume").exists()  # removed once eval.json is written

    assert main(["eval", str(run_dir), *FAST_EVAL, "--attacks", "pgd", "--no-checks"]) == 0
    second = json.loads((run_dir / "eval" / "eval-2.json").read_text())
    assert second["settings"]["eps_list"] == [0.3] and second["settings"]["attacks"] == ["pgd"]
    assert (run_dir / "eval" / "eval-2.csv").is_file()
    assert json.loads((run_dir / "eval" / "eval.json").read_text()) == report

    out_dir = run_dir.parent / "elsewhere"
    args = ["eval", str(run_dir / "last.safetensors"), *FAST_EVAL, "--attacks", "fgsm"]
    assert main([*args, "--no-checks", "--out", str(out_dir)]) == 0
    assert main([*args, "--no-checks", "--out", str(out_dir), "--overwrite"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["eval.csv", "eval.json"]


def test_eval_transfer_from_a_source_run(tmp_path, capsys):
    target, source = make_run(tmp_path, "target"), make_run(tmp_path, "source")
    args = ["eval", str(target), *FAST_EVAL, "--attacks", "pgd", "--no-checks"]
    assert main([*args, "--source", str(source)]) == 0
    report = json.loads((target / "eval" / "eval.json").read_text())
    assert "transfer" in report["results"][0]["attacks"]
    assert "transfer" in capsys.readouterr().out


# ---------------------------------------------------------------- measure and plot


def test_measure_writes_csv_and_png(run_dir, capsys):
    assert main(["measure", str(run_dir), "--n", "16", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "FOSC mean" in out and "measure.png" in out
    lines = (run_dir / "measure" / "measure.csv").read_text().splitlines()
    assert lines[0] == "step,fosc_mean,fosc_median,fosc_p10,fosc_p90,loss_mean,accuracy"
    assert len(lines) == 7
    assert_png(run_dir / "measure" / "measure.png")
    args = ["measure", str(run_dir), "--n", "8", "--steps", "2", "--loss", "cw"]
    assert main([*args, "--no-random-start", "--eps", "0.1", "--alpha", "0.05"]) == 0
    assert_png(run_dir / "measure" / "measure-2.png")


def test_plot_writes_pngs_and_prints_paths(tmp_path, capsys):
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", method="madry")]
    out_dir = tmp_path / "figs"
    assert main(["plot", *map(str, runs), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["accuracy.png", "fosc.png", "grad_evals.png"]
    for p in printed:
        assert_png(Path(p))
    assert main(["plot", str(runs[0])]) == 0
    assert_png(runs[0] / "plots" / "fosc.png")


# ---------------------------------------------------------------- bad input


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "empty-run"
    run.mkdir()
    atomic_write_json(run / "config.json", config())
    assert main(["eval", str(run), *FAST_EVAL]) == 2
    assert "no checkpoint" in one_error_line(capsys)
    assert main(["measure", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in one_error_line(capsys)


@pytest.mark.usefixtures("restore_torch_globals")
def test_eval_on_a_truncated_checkpoint_is_one_line(finished, capsys):
    truncate_half(finished / "best.safetensors")
    rc, _, err = run_cli(capsys, ["eval", finished, "--n", "8", "--no-progress", "--no-checks"])
    assert_one_line_error(rc, err, "best.safetensors")
    assert not (finished / "eval").exists()


@pytest.mark.parametrize("verb", ["eval", "measure"])
def test_truncated_checkpoint_is_one_line(run_dir, capsys, verb):
    for name in ("best", "last", "best-prev", "last-prev"):
        path = run_dir / f"{name}.safetensors"
        if path.exists():
            path.write_bytes(path.read_bytes()[:100])
    assert main([verb, str(run_dir), "--n", "4"]) == 2
    assert "truncated" in one_error_line(capsys)


def test_corrupt_plain_weights_file_is_one_line(run_dir, capsys):
    bad = run_dir / "weights.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert main(["eval", str(bad), *FAST_EVAL]) == 2
    assert "weights.safetensors" in one_error_line(capsys)


@pytest.mark.parametrize("eps", ["0", "-0.1", "1.5", "nan", "inf", "abc"])
def test_bad_eps_is_one_line(run_dir, capsys, eps):
    assert main(["eval", str(run_dir), *FAST_EVAL, "--eps", eps]) == 2
    assert "eps" in one_error_line(capsys)
    assert main(["measure", str(run_dir), "--n", "4", "--eps", eps]) == 2
    assert "eps" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--attacks", "pgd", "deepfool"], "deepfool"),
        (["--n", "0"], "--n"),
        (["--pgd-steps", "0"], "pgd_steps"),
        (["--which", "worst"], "which"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--dataset", "cifar10"], "data directory"),
    ],
)
def test_bad_eval_options_are_one_line(run_dir, capsys, args, match):
    assert main(["eval", str(run_dir), *FAST_EVAL, *args]) == 2
    assert match in one_error_line(capsys)


def test_bad_config_is_one_line(tmp_path, capsys):
    run = make_run(tmp_path, "r")
    (run / "config.json").write_text(json.dumps({"dataset": "mnist5k"}))
    assert main(["eval", str(run), *FAST_EVAL]) == 2
    assert "model" in one_error_line(capsys)
    (run / "config.json").write_text("{broken")
    assert main(["eval", str(run), *FAST_EVAL]) == 2
    assert "config.json" in one_error_line(capsys)


def test_plot_without_metrics_is_one_line(tmp_path, capsys):
    run = tmp_path / "bare"
    run.mkdir()
    assert main(["plot", str(run)]) == 2
    assert "bare" in one_error_line(capsys)
