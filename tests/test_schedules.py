"""Schedules over training time (fosctrain.schedules): DAT's FOSC target c_t (linear, as in
Algorithm 1, and cosine), CAT's step curriculum, FAT's tau and the learning-rate factor, at
given epochs (whole and fractional, before the start and past T') against hand-computed values;
and the CIFAR-10 presets' learning-rate drops."""

from __future__ import annotations

import pytest

from fosctrain.config import resolve
from fosctrain.schedules import curriculum_steps, decay, fat_tau, fosc_target, lr_factor


def test_decay_and_fosc_target_match_hand_values():
    assert [decay(t, 100) for t in (0, 25, 50, 100, 150)] == pytest.approx([1, 0.75, 0.5, 0, 0])
    # (1 + cos(pi t / T')) / 2: 1, (1 + 1/sqrt 2) / 2, 1/2, (1 - 1/sqrt 2) / 2, 0, 0
    cosine = [decay(t, 100, "cosine") for t in (0, 25, 50, 75, 100, 150)]
    assert cosine == pytest.approx([1, 0.8535533906, 0.5, 0.1464466094, 0, 0])
    assert fosc_target(25, 0.5, 100, "cosine") == pytest.approx(0.4267766953)
    assert fosc_target(25, 0.5, 100) == pytest.approx(0.375)  # Algorithm 1's linear decay
    assert fosc_target(10, 0.5, 8) == 0  # a shorter T': 0 from T' on
    with pytest.raises(ValueError):
        decay(1, 10, "step")


def test_schedules():
    assert fosc_target(0, 0.5, 100) == 0.5
    assert fosc_target(50, 0.5, 100) == pytest.approx(0.25)
    assert fosc_target(100, 0.5, 100) == 0 and fosc_target(119, 0.5, 100) == 0
    assert [curriculum_steps(t, 3, 8) for t in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert [fat_tau(t, 0, 3, 8) for t in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert lr_factor(59, "multistep", 120, [60, 100], 0.1) == 1
    assert lr_factor(60, "multistep", 120, [60, 100], 0.1) == pytest.approx(0.1)
    assert lr_factor(100, "multistep", 120, [60, 100], 0.1) == pytest.approx(0.01)
    assert lr_factor(60, "cosine", 120, [], 0.1) == pytest.approx(0.5)

    # 33 / 40, 40.7 / 40, 44 / 40, 220 / 40, 396 / 40, 407 / 40, then capped at K


@pytest.mark.parametrize("preset", ["cifar10-cnn-paper", "cifar10-wrn-paper"])
def test_cifar_presets_drop_lr_where_the_official_loop_does(preset):
    """The official loop tests (ep + 1) == 60 and 100 at each epoch's start: the learning rate
    is lr / 10 from 0-based epoch 59 on, lr / 100 from epoch 99 on."""
    c = resolve(preset, overrides={"data_dir": "unused"})
    lr = [
        c.lr * lr_factor(e, c.lr_schedule, c.epochs, c.lr_milestones, c.lr_gamma)
        for e in range(120)
    ]
    assert lr[58] == pytest.approx(0.01) and lr[59] == pytest.approx(0.001)
    assert lr[98] == pytest.approx(0.001) and lr[99] == pytest.approx(0.0001)
