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


def test_decay_and_fosc_target_at_fractional_and_out_of_range_times():
    """t / T' is clamped to [0, 1]; a per-iteration schedule passes fractional epochs."""
    assert decay(-5, 40) == 1.0 and decay(-3, 30, "cosine") == 1.0
    assert decay(30, 40) == pytest.approx(0.25)
    assert decay(10.5, 42) == pytest.approx(0.75)
    assert decay(41, 40) == 0.0 and decay(45, 30, "cosine") == 0.0
    # cosine: (1 + cos(pi / 3)) / 2 = 0.75 at T' / 3, (1 + cos(2 pi / 3)) / 2 = 0.25 at 2 T' / 3
    assert decay(10, 30, "cosine") == pytest.approx(0.75)
    assert decay(20, 30, "cosine") == pytest.approx(0.25)
    assert fosc_target(10, 0.4, 30, "cosine") == pytest.approx(0.3)
    # Algorithm 1's c_t = max(c_max - t c_max / T', 0)
    assert fosc_target(30, 0.5, 40) == pytest.approx(0.125)  # 0.5 - 30 * 0.5 / 40
    assert fosc_target(39.5, 0.5, 40) == pytest.approx(0.00625)  # 0.5 - 39.5 * 0.5 / 40
    assert fosc_target(10.5, 0.2, 21) == pytest.approx(0.1)  # 0.2 - 10.5 * 0.2 / 21
    assert fosc_target(41, 0.5, 40) == 0.0  # never negative


def test_curriculum_steps_grow_in_k_plus_1_equal_stages():
    """min(K, floor((K + 1) t / T')): K = 10 over T' = 40, a stage every 40 / 11 epochs."""
    times = (0, 3, 3.7, 4, 20, 36, 37, 40, 55)
    assert [curriculum_steps(t, 10, 40) for t in times] == [0, 0, 1, 1, 5, 9, 10, 10, 10]
    # 33 / 40, 40.7 / 40, 44 / 40, 220 / 40, 396 / 40, 407 / 40, then capped at K


def test_fat_tau_grows_from_its_start_in_equal_stages():
    """min(tau_max, tau_start + floor((tau_max - tau_start + 1) t / T')): 1 to 4 over T' = 10."""
    times = (0, 2, 2.5, 5, 7.4, 7.5, 9.9, 10, 30)
    assert [fat_tau(t, 1, 4, 10) for t in times] == [1, 1, 2, 3, 3, 4, 4, 4, 4]
    # 4 t / 10 = 0, 0.8, 1, 2, 2.96, 3, 3.96, then 1 + 4 and 1 + 12 capped at 4
    assert [fat_tau(t, 2, 2, 10) for t in (0, 5, 10, 20)] == [2, 2, 2, 2]  # start = max


def test_lr_factor_multistep_cosine_and_constant_by_hand():
    multistep = [lr_factor(e, "multistep", 40, [10, 20, 30], 0.5) for e in (0, 9, 10, 19, 20, 30)]
    assert multistep == [1, 1, 0.5, 0.5, 0.25, 0.125]  # gamma ** (milestones passed)
    # (1 + cos(pi e / E)) / 2 at e / E = 0, 1/4, 1/2, 1
    cosine = [lr_factor(e, "cosine", 80, [10], 0.1) for e in (0, 20, 40, 80)]
    assert cosine == pytest.approx([1, 0.8535533906, 0.5, 0])
    assert [lr_factor(e, "constant", 40, [10, 20], 0.1) for e in (0, 15, 39)] == [1, 1, 1]


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
