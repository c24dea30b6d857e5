"""Fault injection through the `fosc` command line (issue 7): SIGKILL at random points and
mid-checkpoint-write, SIGINT/SIGTERM, damaged checkpoints, malicious pickles, bad data files,
non-finite losses. Every run is tiny (128 examples, 3 epochs of 4 batches, one thread).

Runs that must be killed go through a subprocess (`python -m fosctrain`); the rest call
`fosctrain.cli.main` in this process (no interpreter start-up) with torch's thread count and
RNG state restored afterwards.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fosctrain import cli
from fosctrain import train as train_mod
from fosctrain import trainer as trainer_mod
from fosctrain.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest_valid,
)
from fosctrain.weights import load_weights

TINY = [
    "--train-n", "128", "--epochs", "3", "--batch-size", "16", "--steps", "2",
    "--val-n", "32", "--eval-steps", "2", "--threads", "1", "--no-progress",
    "--checkpoint-every", "1", "--test-attack", "none",  # faults in training, not the report
]  # fmt: skip
TIME_COLUMNS = ("epoch_time_s", "time_s")
SRC = Path(__file__).resolve().parents[1] / "src" / "fosctrain"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """In-process runs set torch's thread count and seed its global RNG: undo both."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC.parent), env.get("PYTHONPATH")]))
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fosctrain", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _fosc(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fosctrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`fosc ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse --help / --version
        rc = e.code if isinstance(e.code, int) else 0
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("fosc: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def _model_tensors(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(str(run_dir / f"{name}.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def _metrics(run_dir: Path, missing_ok: bool = False) -> list[str]:
    """metrics.jsonl rows without the wall-clock columns, as canonical JSON strings."""
    path = run_dir / "metrics.jsonl"
    if missing_ok and not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIME_COLUMNS}, sort_keys=True)
        for r in rows
    ]


def _assert_same_run(a: Path, b: Path) -> None:
    """Same final (and best) weights bit for bit, same metrics apart from times."""
    for name in ("last", "best"):
        ta, tb = _model_tensors(a, name), _model_tensors(b, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k}"
    assert _metrics(a) == _metrics(b)
    summary = json.loads((b / "summary.json").read_text())
    assert summary["epochs"] == 3


def _config_hash(run_dir: Path) -> str:
    return trainer_mod.stored_config(run_dir).hash()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One uninterrupted tiny run, in its own process (read-only for the tests)."""
    runs = tmp_path_factory.mktemp("baseline")
    done = _fosc(["train", *TINY, "--runs-dir", str(runs), "--name", "r"])
    assert done.returncode == 0, done.stderr
    return runs / "r"


@pytest.fixture
def finished(baseline, tmp_path) -> Path:
    """A private copy of the finished baseline run."""
    run = tmp_path / "copy"
    shutil.copytree(baseline, run)
    return run


# --------------------------------------------------------------------------- SIGKILL


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


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(baseline, tmp_path):
    rng = random.Random(int(os.environ.get("FOSC_FAULT_SEED", "7")))
    run = tmp_path / "r"
    expected_hash = _config_hash(baseline)
    kills, fallbacks = 0, 0
    for cycle in range(12):
        fresh = ["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]
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
        ta, tb = _model_tensors(baseline, name), _model_tensors(run, name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    final = [json.loads((d / "summary.json").read_text())["final"] for d in (baseline, run)]
    final = [json.dumps({k: v for k, v in f.items() if k not in TIME_COLUMNS}) for f in final]
    assert final[0] == final[1]
    expected, got = _metrics(baseline), _metrics(run, missing_ok=True)
    assert got == expected


def test_sigkill_before_the_first_checkpoint_can_be_resumed(baseline, tmp_path, capsys):
    run = tmp_path / "r"
    proc = _start(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r"])
    first_write = lambda: any(n.startswith(".last.") for n in _temp_files(run))  # noqa: E731
    assert _wait_for(lambda: first_write() or (run / "last.json").exists(), proc)
    proc.kill()
    proc.communicate()
    if (run / "last.json").exists():
        pytest.skip("the first checkpoint completed before the kill landed")
    rc, _, err = _cli(capsys, ["train", "--resume", run, "--no-progress"])
    assert rc == 0, err
    _assert_same_run(baseline, run)


# --------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_exits_130_and_resume_equals_uninterrupted(baseline, tmp_path, capsys, sig):
    run = tmp_path / "r"
    proc = _start(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r"])
    assert _wait_for(lambda: (run / "last.json").exists(), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"fosc train --resume {run}" in err
    assert not _temp_files(run)  # a graceful stop leaves no debris
    ckpt = load_checkpoint(run, "last", expected_config_hash=_config_hash(run))  # no fallback
    state = json.loads(ckpt.state()["run"])
    assert (state["epoch"], state["batch"]) < (3, 0)
    rc, _, err = _cli(capsys, ["train", "--resume", run, "--no-progress"])
    assert rc == 0, err
    _assert_same_run(baseline, run)


# --------------------------------------------------------------------------- checkpoint integrity


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "flipped-byte"])
def test_damaged_last_falls_back_to_prev_with_a_warning(baseline, finished, capsys, damage):
    damage(finished / "last.safetensors")
    rc, _, err = _cli(capsys, ["train", "--resume", finished, "--no-progress"])
    assert rc == 0, err
    assert "fosc: warning: skipped checkpoint 'last'" in err
    assert "Traceback" not in err
    # last-prev is the state one batch before the end: replaying it gives the same run.
    _assert_same_run(baseline, finished)


def test_damaged_last_and_prev_is_one_clear_line(finished, capsys):
    _truncate(finished / "last.safetensors")
    (finished / "last-prev.json").write_text("{ not json")
    rc, _, err = _cli(capsys, ["train", "--resume", finished, "--no-progress"])
    _assert_one_line_error(rc, err, "no valid checkpoint", "last-prev")


def test_resume_with_a_different_config_is_refused(finished, capsys):
    rc, _, err = _cli(capsys, ["train", "--resume", finished, "--lr", "0.5"])
    _assert_one_line_error(rc, err, "different configuration", "lr")


def test_checkpoint_of_another_config_is_refused_not_fallen_back_from(finished, capsys):
    config = json.loads((finished / "config.json").read_text())
    config["lr"] = 0.02
    # The checkpoints now claim the old configuration, config.json the new one.
    (finished / "config.json").write_text(json.dumps(config))
    rc, _, err = _cli(capsys, ["train", "--resume", finished, "--no-progress"])
    _assert_one_line_error(rc, err, "different configuration", "last.safetensors")
    assert "warning" not in err


def test_eval_on_a_truncated_checkpoint_is_one_line(finished, capsys):
    _truncate(finished / "best.safetensors")
    rc, _, err = _cli(capsys, ["eval", finished, "--n", "8", "--no-progress", "--no-checks"])
    _assert_one_line_error(rc, err, "best.safetensors")
    assert not (finished / "eval").exists()


def test_stray_temp_files_of_a_killed_write_are_removed_on_resume(finished, capsys):
    """What a SIGKILL inside files.atomic_write_bytes leaves behind (mkstemp's name)."""
    stray = finished / ".last.safetensors.k1ll3d_.tmp"
    stray.write_bytes((finished / "last.safetensors").read_bytes()[:1000])
    link = finished / ".last-prev.json.4242.link"
    link.write_text("{}")
    rc, _, err = _cli(capsys, ["train", "--resume", finished, "--no-progress"])
    assert rc == 0, err
    assert not stray.exists() and not link.exists()


class _Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after the raise runs."""


def _tiny_config(**kw):
    from fosctrain.config import resolve

    base = dict(method="natural", train_n=64, epochs=2, batch_size=32, val_n=16, threads=1)
    return resolve(overrides={**base, "eval_steps": 1, **kw})


def test_crash_before_the_final_metrics_write_is_repaired_on_resume(tmp_path, monkeypatch):
    real = train_mod.write_metrics

    def crash_on_final(run_dir, history):
        if len(history) == 2:
            raise _Killed
        real(run_dir, history)

    monkeypatch.setattr(train_mod, "write_metrics", crash_on_final)
    with pytest.raises(_Killed):
        train_mod.train(_tiny_config(), tmp_path / "r", progress=False)
    monkeypatch.setattr(train_mod, "write_metrics", real)
    train_mod.train(_tiny_config(), tmp_path / "r", resume=True, progress=False)
    assert len(_metrics(tmp_path / "r")) == 2


def test_crash_while_saving_best_keeps_the_previous_best(tmp_path, monkeypatch):
    import fosctrain.checkpoint as ckpt_mod

    epochs = iter(range(1, 10))

    def improving(*args, **kwargs):  # robust accuracy improves: `best` is saved every epoch
        return {"clean_acc": 0.5, "robust_acc": next(epochs) / 10}

    monkeypatch.setattr(train_mod, "val_accuracy", improving)
    real = ckpt_mod.atomic_write_json

    def crash_on_second_best(path, obj):
        if Path(path).name == "best.json" and Path(path).exists():
            raise _Killed
        real(path, obj)

    monkeypatch.setattr(ckpt_mod, "atomic_write_json", crash_on_second_best)
    with pytest.raises(_Killed):
        train_mod.train(_tiny_config(), tmp_path / "r", progress=False)
    best, _ = load_latest_valid(tmp_path / "r", "best")
    assert json.loads(best.state()["run"])["epoch"] == 1


# --------------------------------------------------------------------------- no code execution


class _Evil:
    """Unpickling this creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(finished, tmp_path, capsys):
    marker = tmp_path / "pwned"
    zipped = finished / "evil.pt"  # torch.save's zip format
    torch.save({"0.weight": torch.zeros(1), "x": _Evil(marker)}, zipped)
    legacy = finished / "legacy.pth"  # a bare pickle stream
    legacy.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    assert not marker.exists()
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match=path.name) as info:
            load_weights(path)
        assert "\n" not in str(info.value)
        assert not marker.exists()
    rc, _, err = _cli(capsys, ["eval", zipped, "--n", "8", "--no-progress", "--no-checks"])
    _assert_one_line_error(rc, err, "evil.pt")
    rc, _, err = _cli(capsys, ["attack", legacy, "--n", "8", "--steps", "1"])
    _assert_one_line_error(rc, err, "legacy.pth")
    assert not marker.exists()


FORBIDDEN = {"eval", "exec", "compile", "__import__"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in FORBIDDEN:
            found.append(f"{f.id}()")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            name = f"{f.value.id}.{f.attr}"
            if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads"):
                found.append(name)
            if name in ("yaml.load", "yaml.unsafe_load", "dill.load", "dill.loads"):
                found.append(name)
            if name == "torch.load":
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append("torch.load without weights_only=True")
        if f"{ast.unparse(f)}".endswith(("Unpickler", "unsafe_load")):
            found.append(ast.unparse(f))
    return found


def test_package_never_unpickles_or_evaluates_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    bad = {}
    for path in files:
        calls = _unsafe_calls(ast.parse(path.read_text(), str(path)))
        if calls:
            bad[str(path.relative_to(SRC))] = calls
    assert bad == {}
    # The scanner itself does catch what it looks for.
    probe = "pickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\neval('1')\nexec(s)"
    assert len(_unsafe_calls(ast.parse(probe))) == 5
    assert _unsafe_calls(ast.parse("model.eval()\ntorch.load(p, weights_only=True)")) == []


# --------------------------------------------------------------------------- bad data files

IDX = {"train": 20, "t10k": 10}


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def _write_mnist(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in IDX.items():
        pixels = torch.randint(0, 256, (n * 784,), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(
            _idx(2051, (n, 28, 28), pixels.numpy().tobytes())
        )
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(
            _idx(2049, (n,), labels.numpy().tobytes())
        )


def _write_cifar(root: Path, n: int = 4) -> None:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = torch.randint(0, 256, (n, 3073), generator=g, dtype=torch.uint8)
        records[:, 0] %= 10
        (root / name).write_bytes(records.numpy().tobytes())


def _edit(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def _set_byte(offset: int, value: int):
    def fn(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] = value
        return bytes(b)

    return fn


MNIST_FAULTS = {
    "missing-dir": (lambda d: shutil.rmtree(d), "data directory not found", ""),
    "dir-is-a-file": (
        lambda d: (shutil.rmtree(d), d.write_text("x")),
        "data directory not found",
        "",
    ),
    "missing-file": (
        lambda d: (d / "t10k-labels-idx1-ubyte").unlink(),
        "file not found",
        "t10k-labels-idx1-ubyte",
    ),
    "truncated-images": (
        lambda d: _edit(d / "train-images-idx3-ubyte", lambda b: b[:-100]),
        "truncated",
        "train-images-idx3-ubyte",
    ),
    "truncated-header": (
        lambda d: _edit(d / "t10k-images-idx3-ubyte", lambda b: b[:7]),
        "truncated",
        "t10k-images-idx3-ubyte",
    ),
    "wrong-image-shape": (
        lambda d: (d / "train-images-idx3-ubyte").write_bytes(
            _idx(2051, (20, 32, 32), bytes(20 * 32 * 32))
        ),
        "28 x 28",
        "train-images-idx3-ubyte",
    ),
    "bad-magic": (
        lambda d: _edit(d / "train-labels-idx1-ubyte", _set_byte(3, 0x99)),
        "magic",
        "train-labels-idx1-ubyte",
    ),
    "label-out-of-range": (
        lambda d: _edit(d / "t10k-labels-idx1-ubyte", _set_byte(8 + 3, 10)),
        "0..9",
        "t10k-labels-idx1-ubyte",
    ),
    "label-count-mismatch": (
        lambda d: (d / "train-labels-idx1-ubyte").write_bytes(_idx(2049, (19,), bytes(19))),
        "19 labels",
        "train-labels-idx1-ubyte",
    ),
    "corrupt-gzip": (
        lambda d: (
            (d / "train-images-idx3-ubyte").unlink(),
            (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip"),
        ),
        "gzip",
        "train-images-idx3-ubyte.gz",
    ),
}


@pytest.mark.parametrize("fault", sorted(MNIST_FAULTS))
def test_bad_mnist_files_are_one_line_naming_the_file(tmp_path, capsys, fault):
    data = tmp_path / "mnist"
    _write_mnist(data)
    make, message, filename = MNIST_FAULTS[fault]
    make(data)
    argv = ["train", "--dataset", "mnist", "--data-dir", data, *TINY, "--runs-dir", tmp_path]
    rc, _, err = _cli(capsys, [*argv, "--name", "r"])
    _assert_one_line_error(rc, err, message, str(data / filename) if filename else str(data))


def test_unreadable_mnist_file_is_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "mnist"
    _write_mnist(data)
    real = Path.read_bytes

    def refuse(self):  # root ignores chmod, so refuse the read itself
        if self.name == "train-labels-idx1-ubyte":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    argv = ["train", "--dataset", "mnist", "--data-dir", data, *TINY, "--runs-dir", tmp_path]
    rc, _, err = _cli(capsys, [*argv, "--name", "r"])
    _assert_one_line_error(rc, err, "permission denied", "train-labels-idx1-ubyte")


CIFAR_FAULTS = {
    "truncated": (
        lambda d: _edit(d / "data_batch_3.bin", lambda b: b[:-1]),
        "truncated",
        "data_batch_3.bin",
    ),
    "empty": (lambda d: (d / "test_batch.bin").write_bytes(b""), "truncated", "test_batch.bin"),
    "label-out-of-range": (
        lambda d: _edit(d / "data_batch_1.bin", _set_byte(3073, 200)),
        "0..9",
        "data_batch_1.bin",
    ),
    "missing-file": (
        lambda d: (d / "data_batch_5.bin").unlink(),
        "file not found",
        "data_batch_5.bin",
    ),
    "missing-dir": (lambda d: shutil.rmtree(d), "data directory not found", ""),
}


@pytest.mark.parametrize("fault", sorted(CIFAR_FAULTS))
def test_bad_cifar_files_are_one_line_naming_the_file(tmp_path, capsys, fault):
    data = tmp_path / "cifar"
    _write_cifar(data)
    make, message, filename = CIFAR_FAULTS[fault]
    make(data)
    argv = ["train", "--dataset", "cifar10", "--data-dir", data, "--model", "cifar-cnn8"]
    argv += ["--eps", "0.03", *TINY, "--runs-dir", tmp_path, "--name", "r"]
    rc, _, err = _cli(capsys, argv)
    _assert_one_line_error(rc, err, message, str(data / filename) if filename else str(data))


def test_failed_data_load_leaves_no_run_directory_behind(tmp_path, capsys):
    """After a data error the user fixes the files and runs the same command again."""
    data = tmp_path / "mnist"
    _write_mnist(data)
    (data / "train-images-idx3-ubyte").unlink()
    argv = ["train", "--dataset", "mnist", "--data-dir", data, *TINY, "--epochs", "1"]
    argv += ["--train-n", "16", "--val-n", "4", "--runs-dir", tmp_path, "--name", "r"]
    rc, _, err = _cli(capsys, argv)
    _assert_one_line_error(rc, err, "train-images-idx3-ubyte")
    _write_mnist(data)
    rc, _, err = _cli(capsys, argv)
    assert rc == 0, err


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
    _write_cifar(tmp_path / "cifar")
    argv = ["train", *TINY, "--epochs", "1", "--runs-dir", tmp_path, "--name", "r"]
    argv += ["--data-dir", tmp_path / "cifar", "--eps", "0.03", *extra]
    rc, _, err = _cli(capsys, argv)
    _assert_one_line_error(rc, err)


# --------------------------------------------------------------------------- training health


def test_nan_loss_from_a_huge_lr_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    argv = ["train", *TINY, "--lr", "1e30", "--runs-dir", tmp_path, "--name", "r"]
    rc, _, err = _cli(capsys, argv)
    _assert_one_line_error(rc, err, "non-finite training loss", "last good checkpoint")
    run = tmp_path / "r"
    ckpt, warnings = load_latest_valid(run, "last", expected_config_hash=_config_hash(run))
    assert warnings == [] and ckpt.path.name == "last.safetensors"
    state = json.loads(ckpt.state()["run"])
    assert state["epoch"] == 0 and state["batch"] >= 1  # the batch before the bad one
    assert all(torch.isfinite(v).all() for v in ckpt.model_state().values())
    assert not (run / "summary.json").exists()


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory) -> list[dict]:
    """`--lr 1e30 --skip-nonfinite`: batch 1 blows the weights up, every later loss is NaN."""
    runs = tmp_path_factory.mktemp("skip")
    threads = torch.get_num_threads()
    err = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(err):
        argv = ["train", *TINY, "--lr", "1e30", "--skip-nonfinite", "--runs-dir", str(runs)]
        rc = cli.main([*argv, "--name", "r"])
    torch.set_num_threads(threads)
    assert rc == 0, err.getvalue()
    return [json.loads(line) for line in (runs / "r" / "metrics.jsonl").read_text().splitlines()]


def test_skip_nonfinite_skips_the_bad_batches_and_finishes(skipped_run):
    rows = skipped_run
    assert len(rows) == 3
    assert rows[0]["skipped_batches"] == 7  # all but the first of 8 batches
    assert [r["skipped_batches"] for r in rows[1:]] == [8, 8]


def test_an_epoch_with_every_batch_skipped_has_no_train_loss(skipped_run):
    assert skipped_run[2]["train_loss"] is None and skipped_run[2]["train_acc"] is None


def test_skipped_batches_still_count_their_attack_cost(skipped_run):
    totals = [r["attack_grad_evals"] for r in skipped_run]
    assert totals[0] < totals[1] < totals[2]
