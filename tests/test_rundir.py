"""Run directories (fosctrain.rundir): one process per run directory, held by an OS lock that
kill -9 releases; a locked run is neither resumed nor overwritten, and a resume of a missing run
creates nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import TINY_NATURAL_ARGS, subprocess_env

from fosctrain.cli import main

HOLD = (  # what a training process does to its run: flock RUN/.lock and write its pid
    "import fcntl, os, sys, time\n"
    "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "os.write(fd, str(os.getpid()).encode())\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def holder(tmp_path):
    """A finished tiny run, and a process that holds its lock until killed."""
    argv = ["train", *TINY_NATURAL_ARGS, "--no-progress", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--name", "r"]) == 0
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
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
    argv = ["train", *TINY_NATURAL_ARGS, "--runs-dir", str(run.parent), "--name", "r"]
    argv += ["--overwrite"]
    assert main(argv) == 2
    assert f"pid {proc.pid}" in _one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "last.safetensors").is_file() and (run / "metrics.jsonl").is_file()


def test_resume_of_a_missing_run_creates_nothing(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in _one_error_line(capsys)
    assert not (tmp_path / "none").exists()
