"""Shared fixtures: the paper's MNIST CNN (built inline so these tests do not depend on the
model registry), a random [0, 1] image batch, and a tiny linear model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fosctrain.config import Config, resolve

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
