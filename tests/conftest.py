"""Shared fixtures and helpers: the small training run, the paper's MNIST CNN (built inline so
these tests do not depend on the model registry), random and real digit batches, hypothesis'
strategies for FOSC and projection properties, the `fosc` command line in this process and in
a subprocess with a finished tiny run to damage, and synthetic MNIST / CIFAR-10 data files."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

from fosctrain import cli
from fosctrain import train as train_mod
from fosctrain import trainer as trainer_mod
from fosctrain.config import Config, resolve
from fosctrain.data import load_mnist5k
from fosctrain.models import create_model

BATCH = 64

# The one small training run the tests build on (96 digits, 2 epochs of 2 batches, 2-step
# validation); a test states only what it changes, e.g. small_run(method="madry", steps=2).
SMALL_RUN = dict(
    train_n=96,
    epochs=2,
    batch_size=48,
    val_n=40,
    final_eval_n=48,
    eval_steps=2,
    steps=3,
    threads=1,
)


def small_run(**overrides) -> Config:
    """A resolved Config of the small run with `overrides` on top."""
    return resolve(overrides={**SMALL_RUN, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine each intra-op barrier
    can wait for a descheduled thread (measured: 30 ms per op with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def paper_mnist_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, fc128-ReLU, fc10, seeded, in eval mode, with
    BatchNorm running statistics moved away from their initial values by a few train-mode
    forward passes (so eval mode really uses non-trivial statistics)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            # Shifted, scaled inputs so the running statistics end far from (0, 1).
            model(torch.rand(32, 1, 28, 28, generator=gen) * 0.8 + 0.1)
    return model.eval()


def make_batch(n: int = BATCH, seed: int = 1, shape=(1, 28, 28)) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


@pytest.fixture
def cnn() -> nn.Module:
    """A fresh seeded paper MNIST CNN in eval mode (fresh per test: tests may mutate it)."""
    return paper_mnist_cnn()


@pytest.fixture(scope="session")
def shared_cnn() -> nn.Module:
    """One seeded paper CNN in eval mode shared by the whole session: read-only, tests that
    change the model's mode, flags or weights must use `cnn` instead."""
    return paper_mnist_cnn()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 random images in [0, 1] of shape 1 x 28 x 28 with random labels in 0..9."""
    return make_batch()


@pytest.fixture(scope="session")
def shared_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch as `batch`, session-scoped: do not modify in place."""
    return make_batch()


@pytest.fixture
def linear_model() -> nn.Module:
    """A tiny linear classifier on 1 x 4 x 4 inputs (3 classes), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    return model.eval()


# --------------------------------------------------------------------------- real digits


@pytest.fixture(scope="module")
def digits():
    """The first 96 training digits of mnist5k (images, labels)."""
    data = load_mnist5k()
    return data.x_train[:96], data.y_train[:96]


def fresh_model(seed: int = 0) -> nn.Module:
    """The default model as training starts: initial weights, BatchNorm at mean 0, var 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("mnist-cnn")


@pytest.fixture(scope="module")
def model_and_digits():
    """The default model at seed 0 (in eval mode) and the first 32 training digits."""
    torch.manual_seed(0)
    data = load_mnist5k()
    return create_model("mnist-cnn").eval(), data.x_train[:32], data.y_train[:32]


# ------------------------------------------------------- hypothesis: FOSC and projection properties

shapes = st.tuples(
    st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)
)  # N, C, H, W
budgets = st.floats(1e-3, 1.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)
PROPERTIES = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- the command line

# A tiny run of 128 examples, 3 epochs of 8 batches, checkpointed every batch.
TINY_ARGS = [
    "--train-n", "128", "--epochs", "3", "--batch-size", "16", "--steps", "2",
    "--val-n", "32", "--eval-steps", "2", "--threads", "1", "--no-progress",
    "--checkpoint-every", "1", "--test-attack", "none",  # faults in training, not the report
]  # fmt: skip
# A tiny natural run of 64 examples, 2 epochs of 2 batches, with progress.
TINY_NATURAL_ARGS = [
    "--method", "natural", "--train-n", "64", "--epochs", "2", "--batch-size", "32",
    "--val-n", "32", "--final-eval-n", "32", "--eval-steps", "2", "--threads", "1",
]  # fmt: skip
TIME_COLUMNS = ("epoch_time_s", "time_s", "val_time_s")
SRC = Path(__file__).resolve().parents[1] / "src" / "fosctrain"
FAST_EVAL = ["--n", "16", "--pgd-steps", "2", "--cw-steps", "2", "--no-progress"]


@pytest.fixture
def restore_torch_globals():
    """In-process runs set torch's thread count and seed its global RNG: undo both."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m fosctrain` (or other) subprocess: this checkout's src on
    PYTHONPATH, one OpenMP thread, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC.parent), env.get("PYTHONPATH")]))
    return env


def _fosc(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fosctrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`fosc ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse --help / --version
        rc = e.code if isinstance(e.code, int) else 0
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("fosc: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fosc: error: ")
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- a finished tiny run


def model_tensors(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(str(run_dir / f"{name}.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def untimed_metrics(run_dir: Path, missing_ok: bool = False) -> list[str]:
    """metrics.jsonl rows without the wall-clock columns, as canonical JSON strings."""
    path = run_dir / "metrics.jsonl"
    if missing_ok and not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIME_COLUMNS}, sort_keys=True)
        for r in rows
    ]


def assert_same_run(a: Path, b: Path) -> None:
    """Same final (and best) weights bit for bit, same metrics apart from times."""
    for name in ("last", "best"):
        ta, tb = model_tensors(a, name), model_tensors(b, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k}"
    assert untimed_metrics(a) == untimed_metrics(b)
    summary = json.loads((b / "summary.json").read_text())
    assert summary["epochs"] == 3


def config_hash_of(run_dir: Path) -> str:
    return trainer_mod.stored_config(run_dir).hash()


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Path:
    """One uninterrupted tiny run, in its own process (read-only for the tests)."""
    runs = tmp_path_factory.mktemp("baseline")
    done = _fosc(["train", *TINY_ARGS, "--runs-dir", str(runs), "--name", "r"])
    assert done.returncode == 0, done.stderr
    return runs / "r"


@pytest.fixture
def finished(baseline, tmp_path) -> Path:
    """A private copy of the finished baseline run."""
    run = tmp_path / "copy"
    shutil.copytree(baseline, run)
    return run


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --------------------------------------------------------------------------- data files


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(root: Path, gz: bool = False, n_train: int = 20, n_test: int = 10) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train": mnist_arrays(n_train, 0), "t10k": mnist_arrays(n_test, 1)}
    for prefix, (images, labels) in arrays.items():
        _write(root / f"{prefix}-images-idx3-ubyte", idx_images(images), gz)
        _write(root / f"{prefix}-labels-idx1-ubyte", idx_labels(labels), gz)
    return arrays


def _cifar_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    return records.tobytes(), images, labels


def write_cifar(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    arrays = {}
    for seed, name in enumerate(names):
        data, images, labels = _cifar_batch(n, seed)
        (root / name).write_bytes(data)
        arrays[name] = (images, labels)
    return arrays


def stop_after(monkeypatch, n: int):
    """Make the n-th training batch request a stop, as SIGINT / SIGTERM would (the run saves
    and raises Interrupted at that batch's end); returns the real train_batch to restore."""
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
