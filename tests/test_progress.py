"""Progress (fosctrain.progress): where stderr is not a terminal, a run leaves one line per
epoch and no carriage-return updates."""

from __future__ import annotations

import subprocess
import sys

from conftest import TINY_NATURAL_ARGS, subprocess_env


def test_progress_is_one_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fosctrain",
            "train",
            *TINY_NATURAL_ARGS,
            "--runs-dir",
            str(tmp_path),
        ],
        capture_output=True,  # bytes: text mode would turn every "\r" into "\n"
        env=subprocess_env(),
    )
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "\r" not in err
    epochs = [line for line in err.split("\n") if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("val clean" in line and "loss" in line and " s" in line for line in epochs)
