"""Schedules over training time t (in epochs, fractional when a schedule steps per iteration).

All are pure functions of t, so resuming a run needs no schedule state.
"""

from __future__ import annotations

import math

DECAY_SHAPES = ("linear", "cosine")


def decay(t: float, t_prime: float, shape: str = "linear") -> float:
    """A factor falling from 1 at t = 0 to 0 at t = T' and staying 0 after it:
    linear  1 - t / T'                    (Algorithm 1)
    cosine  (1 + cos(pi t / T')) / 2      (flat at both ends: slow at first, then faster)
    """
    s = min(max(t / t_prime, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1 + math.cos(math.pi * s))
    if shape == "linear":
        return 1.0 - s
    raise ValueError(f"unknown decay shape {shape!r}")


def fosc_target(t: float, c_max: float, t_prime: float, shape: str = "linear") -> float:
    """DAT's FOSC target c_t = c_max * decay(t). Linear keeps Algorithm 1's own arithmetic,
    max(c_max - t * c_max / T', 0), so that its thresholds stay bit-identical."""
    if shape == "linear":
        return max(c_max - t * c_max / t_prime, 0.0)
    return c_max * decay(t, t_prime, shape)


def curriculum_steps(t: float, max_steps: int, t_prime: float) -> int:
    """CAT's PGD step count: grows from 0 (clean examples) to K in equal stages over T'."""
    return min(max_steps, math.floor((max_steps + 1) * t / t_prime))


def fat_tau(t: float, tau_start: int, tau_max: int, t_prime: float) -> int:
    """FAT's tau: grows from tau_start to tau_max in equal stages over T' (Zhang et al. 2020)."""
    return min(tau_max, tau_start + math.floor((tau_max - tau_start + 1) * t / t_prime))


def lr_factor(epoch: int, kind: str, epochs: int, milestones: list[int], gamma: float) -> float:
    """Learning-rate multiplier for an epoch: step decay at milestones, cosine, or constant."""
    if kind == "multistep":
        return gamma ** sum(epoch >= m for m in milestones)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return 1.0
