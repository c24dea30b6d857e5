"""One process per run directory (an OS lock that kill -9 releases), and progress that is one
line per epoch where stderr is not a terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fosctrain.cli import main

TINY = [
    "--method", "natural", "--train-n", "64", "--epochs", "2", "--batch-size", "32",
    "--val-n", "32", "--final-eval-n", "32", "--eval-steps", "2", "--threads", "1",
]  # fmt: skip
SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLD = (  # what a training process does to its run: flock RUN/.lock and write its pid
    "import fcntl, os, sys, time\n"
    "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "os.write(fd, str(os.getpid()).encode())\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def holder(tmp_path):
    """A finished tiny run, and a process that holds its lock until killed."""
    assert main(["train", *TINY, "--no-progress", "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_second_process_on_a_run_is_refused_until_the_holder_dies(holder, capsys):
    run, proc = holder
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert str(run) in line and f"pid {proc.pid}" in line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # kill -9 released it


def test_overwrite_of_a_locked_run_is_refused_and_deletes_nothing(holder, capsys):
    run, proc = holder
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    argv = ["train", *TINY, "--runs-dir", str(run.parent), "--name", "r", "--overwrite"]
    assert main(argv) == 2
    assert f"pid {proc.pid}" in _one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "last.safetensors").is_file() and (run / "metrics.jsonl").is_file()


def test_resume_of_a_missing_run_creates_nothing(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in _one_error_line(capsys)
    assert not (tmp_path / "none").exists()


def test_progress_is_one_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fosctrain", "train", *TINY, "--runs-dir", str(tmp_path)],
        capture_output=True,  # bytes: text mode would turn every "\r" into "\n"
        env=_env(),
    )
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "\r" not in err
    epochs = [line for line in err.split("\n") if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("val clean" in line and "loss" in line and " s" in line for line in epochs)
