"""The trainer (fosctrain.trainer): a run killed at random points (SIGKILL, also before its
first checkpoint) or stopped by SIGINT / SIGTERM resumes to the uninterrupted run; a resume
with another configuration is refused and the debris of a killed write removed; data and model
are checked before the run directory exists; the data split, the optimizer's decayed weights,
and the data-parallel world checks.

Runs that must be killed go through a subprocess (`python -m fosctrain`); the rest call
`fosctrain.cli.main` in this process, with torch's thread count and RNG state restored
afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import (
    TIME_COLUMNS,
    TINY_ARGS,
    assert_one_line_error,
    assert_same_run,
    config_hash_of,
    model_tensors,
    run_cli,
    small_run,
    subprocess_env,
    untimed_metrics,
    write_cifar,
    write_mnist,
)
from torch import nn

from fosctrain import trainer as trainer_mod
from fosctrain.checkpoint import CheckpointError, load_checkpoint, load_latest_valid
from fosctrain.config import Config
from fosctrain.errors import UserError
from fosctrain.models import create_model
from fosctrain.trainer import create_optimizer, decayed_weights

# --------------------------------------------------------------------------- SIGKILL


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fosctrain", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll `predicate` (about every millisecond) until it holds; False if proc ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.001)
    raise AssertionError("timed out waiting for the training process")


def _temp_files(run_dir: Path) -> set[str]:
    try:
        return {n for n in os.listdir(run_dir) if n.endswith((".tmp", ".link"))}
    except FileNotFoundError:
        return set()


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _check_files_after_kill(run_dir: Path, expected_hash: str) -> str:
    """Every file a reader would open is whole; `last` (or its rotated predecessor) loads.
    Returns the name of the checkpoint a resume will start from."""
    for path in run_dir.iterdir():
        if path.name.startswith("."):
            continue  # temp files of an interrupted write: never read by anyone
        if path.suffix == ".safetensors":
            safetensors.torch.load(path.read_bytes())  # complete, parseable
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
    ckpt, warnings = load_latest_valid(run_dir, "last", expected_config_hash=expected_hash)
    assert ckpt.path.name in ("last.safetensors", "last-prev.safetensors")
    if ckpt.path.name == "last-prev.safetensors":
        assert warnings and "'last'" in warnings[0]
        with pytest.raises(CheckpointError):
            load_checkpoint(run_dir, "last", expected_config_hash=expected_hash)
    if (run_dir / "best.json").exists() or (run_dir / "best.safetensors").exists():
        try:  # never a crash or a half-written file: valid, or refused with one line
            load_checkpoint(run_dir, "best", expected_config_hash=expected_hash)
        except CheckpointError as e:
            assert "\n" not in str(e)
    return ckpt.path.stem


def _arm_and_wait(proc, run: Path, rng: random.Random) -> bool:
    """Wait for a seeded random kill point; True if one came (False: proc finished first).

    60%: right as the k-th (k = 1..6) temp file of this process appears in the run
    directory (checkpoint, metrics and rotation writes), optionally a few ms later; 40%: a
    random time up to 1 s after this process's first completed checkpoint. Armed only once
    `last` exists: a kill before the very first checkpoint is the next test's subject."""
    stale = _temp_files(run)
    before = _mtime(run / "last.json")
    if not _wait_for(lambda: (run / "last.json").exists(), proc):
        return False
    if rng.random() < 0.6:
        seen: set[str] = set()
        target = rng.randint(1, 6)

        def trigger() -> bool:
            seen.update(_temp_files(run) - stale)
            return len(seen) >= target

        if not _wait_for(trigger, proc):
            return False
        time.sleep(rng.choice([0.0, 0.0, rng.uniform(0, 0.01)]))
    else:
        if not _wait_for(lambda: _mtime(run / "last.json") != before, proc):
            return False
        deadline = time.monotonic() + rng.uniform(0.0, 1.0)
        _wait_for(lambda: time.monotonic() >= deadline, proc)
    return proc.poll() is None


@pytest.mark.usefixtures("restore_torch_globals")
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(baseline, tmp_path):
    rng = random.Random(int(os.environ.get("FOSC_FAULT_SEED", "7")))
    run = tmp_path / "r"
    expected_hash = config_hash_of(baseline)
    kills, fallbacks = 0, 0
    for cycle in range(12):
        fresh = ["train", *TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "r"]
        proc = _start(fresh if cycle == 0 else ["train", "--resume", str(run), "--no-progress"])
        if kills < 5 and _arm_and_wait(proc, run, rng):
            proc.kill()
            _, err = proc.communicate()
            if proc.returncode == -signal.SIGKILL:  # (not if it exited just before)
                kills += 1
                fallbacks += _check_files_after_kill(run, expected_hash) == "last-prev"
                continue
        else:
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        break
    print(f"{kills} kills, {fallbacks} resumed from last-prev")
    assert kills >= 3
    for name in ("last", "best"):
        ta, tb = model_tensors(baseline, name), model_tensors(run, name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    final = [json.loads((d / "summary.json").read_text())["final"] for d in (baseline, run)]
    final = [json.dumps({k: v for k, v in f.items() if k not in TIME_COLUMNS}) for f in final]
    assert final[0] == final[1]
    expected, got = untimed_metrics(baseline), untimed_metrics(run, missing_ok=True)
    assert got == expected


@pytest.mark.usefixtures("restore_torch_globals")
def test_sigkill_before_the_first_checkpoint_can_be_resumed(baseline, tmp_path, capsys):
    run = tmp_path / "r"
    proc = _start(["train", *TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "r"])
    first_write = lambda: any(n.startswith(".last.") for n in _temp_files(run))  # noqa: E731
    assert _wait_for(lambda: first_write() or (run / "last.json").exists(), proc)
    proc.kill()
    proc.communicate()
    if (run / "last.json").exists():
        pytest.skip("the first checkpoint completed before the kill landed")
    rc, _, err = run_cli(capsys, ["train", "--resume", run, "--no-progress"])
    assert rc == 0, err
    assert_same_run(baseline, run)


# --------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.usefixtures("restore_torch_globals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_exits_130_and_resume_equals_uninterrupted(baseline, tmp_path, capsys, sig):
    run = tmp_path / "r"
    proc = _start(["train", *TINY_ARGS, "--runs-dir", str(tmp_path), "--name", "r"])
    assert _wait_for(lambda: (run / "last.json").exists(), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"fosc train --resume {run}" in err
    assert not _temp_files(run)  # a graceful stop leaves no debris
    ckpt = load_checkpoint(run, "last", expected_config_hash=config_hash_of(run))  # no fallback
    state = json.loads(ckpt.state()["run"])
    assert (state["epoch"], state["batch"]) < (3, 0)
    rc, _, err = run_cli(capsys, ["train", "--resume", run, "--no-progress"])
    assert rc == 0, err
    assert_same_run(baseline, run)


# --------------------------------------------------------------------------- resume


@pytest.mark.usefixtures("restore_torch_globals")
def test_resume_with_a_different_config_is_refused(finished, capsys):
    rc, _, err = run_cli(capsys, ["train", "--resume", finished, "--lr", "0.5"])
    assert_one_line_error(rc, err, "different configuration", "lr")


@pytest.mark.usefixtures("restore_torch_globals")
def test_stray_temp_files_of_a_killed_write_are_removed_on_resume(finished, capsys):
    """What a SIGKILL inside files.atomic_write_bytes leaves behind (mkstemp's name)."""
    stray = finished / ".last.safetensors.k1ll3d_.tmp"
    stray.write_bytes((finished / "last.safetensors").read_bytes()[:1000])
    link = finished / ".last-prev.json.4242.link"
    link.write_text("{}")
    rc, _, err = run_cli(capsys, ["train", "--resume", finished, "--no-progress"])
    assert rc == 0, err
    assert not stray.exists() and not link.exists()


# ---------------------------------------------------------- checked before the run directory exists


@pytest.mark.usefixtures("restore_torch_globals")
def test_failed_data_load_leaves_no_run_directory_behind(tmp_path, capsys):
    """After a data error the user fixes the files and runs the same command again."""
    data = tmp_path / "mnist"
    write_mnist(data)
    (data / "train-images-idx3-ubyte").unlink()
    argv = ["train", "--dataset", "mnist", "--data-dir", data, *TINY_ARGS, "--epochs", "1"]
    argv += ["--train-n", "16", "--val-n", "4", "--runs-dir", tmp_path, "--name", "r"]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, "train-images-idx3-ubyte")
    write_mnist(data)
    rc, _, err = run_cli(capsys, argv)
    assert rc == 0, err


@pytest.mark.usefixtures("restore_torch_globals")
@pytest.mark.parametrize(
    "extra",
    [
        ["--dataset", "cifar10", "--model", "mnist-cnn"],
        ["--dataset", "mnist5k", "--model", "cifar-cnn8"],
        ["--num-classes", "3"],
    ],
    ids=["mnist-model-on-cifar", "cifar-model-on-mnist", "too-few-classes"],
)
def test_model_that_does_not_fit_the_data_is_one_line(tmp_path, capsys, extra):
    write_cifar(tmp_path / "cifar")
    argv = ["train", *TINY_ARGS, "--epochs", "1", "--runs-dir", tmp_path, "--name", "r"]
    argv += ["--data-dir", tmp_path / "cifar", "--eps", "0.03", *extra]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err)


# ----------------------------------------------------------------------- data, optimizer, processes


def test_run_trains_on_nothing_it_validates_on():
    config = small_run(train_n=0, val_n=200, steps=2)
    data = trainer_mod.load_data(config)
    assert len(data.y_train) == 3800 and len(data.y_val) == 200
    train_rows = {bytes(r.numpy()) for r in data.x_train.flatten(1)}
    assert not any(bytes(r.numpy()) in train_rows for r in data.x_val.flatten(1))
    assert torch.bincount(data.y_val, minlength=10).tolist() == [20] * 10
    other_seed = trainer_mod.load_data(small_run(train_n=0, val_n=200, seed=7, steps=2))
    assert torch.equal(other_seed.x_val, data.x_val)


def test_weight_decay_targets():
    model = create_model("cifar-cnn8", num_classes=10, in_channels=3)
    fc256 = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    assert fc256.out_features == 256
    assert decayed_weights(model, "hidden-linear") == {fc256.weight}
    kernels = decayed_weights(model, "kernels")
    expected = {m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert kernels == expected and len(kernels) == 8  # 6 convolutions, 2 linear layers
    assert decayed_weights(model, "all") == set(model.parameters())


def test_kernel_weight_decay_equals_the_keras_l2_loss_term():
    """SGD with weight decay 4e-3 on the kernels only == plain SGD on loss + 2e-3 sum w^2."""
    torch.manual_seed(0)
    ours = create_model("mnist-cnn", num_classes=10, in_channels=1)
    keras = create_model("mnist-cnn", num_classes=10, in_channels=1)
    keras.load_state_dict(ours.state_dict())
    config = Config(optimizer="sgd", lr=0.1, weight_decay=4e-3, weight_decay_on="kernels")
    opt_ours = create_optimizer(config, ours)
    opt_keras = torch.optim.SGD(keras.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, opt, l2 in ((ours, opt_ours, 0.0), (keras, opt_keras, 2e-3)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            penalty = sum((w**2).sum() for w in decayed_weights(model, "kernels"))
            (loss + l2 * penalty).backward()
            opt.step()
    for a, b in zip(ours.parameters(), keras.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_batches_is_refused_data_parallel():
    cfg = small_run(method="dat", c_max_calibration="first-batches")
    dist = SimpleNamespace(enabled=True, world=2, device=torch.device("cpu"))
    with pytest.raises(UserError, match="one process only"):
        trainer_mod.check_world(cfg, dist, 96)
    trainer_mod.check_world(small_run(method="dat"), dist, 96)  # initial: fine
