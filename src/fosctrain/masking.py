"""Gradient-masking sanity checks of an evaluation: the rules, their thresholds and the warnings
they raise. fosctrain.evaluate runs the extra attacks the checks need and hands the numbers here.

Each check adds a warning with its numbers to `EvalReport.warnings`:
- FGSM stronger than PGD by more than CHECK_MARGIN: a one-step attack beating PGD points to
  masked or noisy gradients.
- A stronger PGD (`stronger`: 2x steps at half the step size, one more restart) on the first
  `check_n` examples lowers accuracy by more than CHECK_MARGIN: PGD has not converged.
- PGD accuracy at a large budget (`large_eps`: min(1, max(0.5, 4 x the largest eps)) for
  L-inf, 4 x the largest eps for L2) is above LARGE_EPS_MAX_ACC (10%): at eps 0.5 every
  pixel of near-binary data can be moved to grey, at eps 1 the ball is the whole image box,
  so a working attack reaches ~0%.
- The transfer attack beats white-box PGD by more than CHECK_MARGIN.
- PGD's final mean FOSC is above FOSC_RATIO_MAX (50%) of its mean at the random start, both
  in absolute terms and relative to the gradient scale (the absolute ratio alone fires
  whenever gradients grow as PGD climbs the loss): the attack has not converged.
- The input gradient is exactly zero at PGD's random start for more than
  ZERO_GRAD_MAX (50%) of the examples: PGD cannot move (masked or saturated gradients).
- Square (gradient-free, the standard AutoAttack's last component) lowers accuracy by more
  than CHECK_MARGIN below what every gradient attack of the suite left: the gradients mislead
  the attacks that follow them. Free: it reads the suite's own per-component results, so it
  runs whenever the standard suite does, with or without the other checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CHECK_MARGIN = 0.03
LARGE_EPS_MAX_ACC = 0.10
FOSC_RATIO_MAX = 0.5
ZERO_GRAD_MAX = 0.5
CHECK_N = 256


def stronger(steps: int, restarts: int, alpha: float) -> tuple[int, int, float]:
    """The stronger PGD of the convergence check: (steps, restarts, step size)."""
    return 2 * steps, restarts + 1, alpha / 2


def large_eps(eps_list: Sequence[float], norm: str = "linf") -> float:
    """The budget of the large-eps check: min(1, max(0.5, 4 max eps)) for L-inf on [0, 1]
    pixels, 4 max eps for L2."""
    top = 4 * max(eps_list)
    return min(1.0, max(0.5, top)) if norm == "linf" else top


def fgsm_warnings(eps: float, fgsm: float, pgd: float, steps: int) -> list[str]:
    if fgsm >= pgd - CHECK_MARGIN:
        return []
    return [
        f"eps={eps:g}: FGSM accuracy {fgsm:.1%} is below PGD-{steps} accuracy {pgd:.1%} by "
        f"more than {CHECK_MARGIN:.0%}: a one-step attack should not beat PGD (masked or "
        "noisy gradients, or a PGD step size that is too small)"
    ]


def stronger_warnings(eps: float, numbers: dict, steps: int, restarts: int) -> list[str]:
    base, strong = numbers["pgd_acc_subset"], numbers["stronger_acc_subset"]
    if base - strong <= CHECK_MARGIN:
        return []
    return [
        f"eps={eps:g}: a stronger PGD ({numbers['stronger_steps']} steps, "
        f"{numbers['stronger_restarts']} restarts) lowers accuracy on the first "
        f"{numbers['stronger_n']} examples from {base:.1%} to {strong:.1%} (more than "
        f"{CHECK_MARGIN:.0%}): PGD-{steps} x{restarts} has not converged and "
        "overestimates robustness"
    ]


def transfer_warnings(eps: float, transfer: float, pgd: float) -> list[str]:
    if transfer >= pgd - CHECK_MARGIN:
        return []
    return [
        f"eps={eps:g}: the transfer attack (PGD crafted on the source model) gives accuracy "
        f"{transfer:.1%}, below white-box PGD's {pgd:.1%} by more than {CHECK_MARGIN:.0%}: "
        "the model's own gradients are probably masked"
    ]


def fosc_warnings(eps: float, fosc: dict[str, float]) -> list[str]:
    out = []
    ratio = fosc.get("ratio", float("nan"))
    relative = fosc.get("relative_ratio", float("nan"))
    if _above(ratio, FOSC_RATIO_MAX) and _above(relative, FOSC_RATIO_MAX):
        out.append(
            f"eps={eps:g}: PGD has not converged: its final mean FOSC {fosc['mean']:.4g} is "
            f"{ratio:.0%} of the {fosc['first_step_mean']:.4g} at its random start, and "
            f"relative to the gradient scale {relative:.0%} ({fosc['relative_mean']:.3f} vs "
            f"{fosc['relative_first_mean']:.3f}), both more than {FOSC_RATIO_MAX:.0%}; try "
            "more steps or a smaller step size"
        )
    zero = fosc.get("zero_grad_frac", 0.0)
    if zero > ZERO_GRAD_MAX:
        out.append(
            f"eps={eps:g}: the input gradient is exactly zero at PGD's random start for "
            f"{zero:.0%} of the examples: PGD cannot move (masked gradients, e.g. quantized "
            "inputs, or a saturated softmax; try the cw attack)"
        )
    return out


def gradient_free_warnings(eps: float, gradient: float, square: float) -> list[str]:
    """`gradient`: accuracy after the suite's gradient attacks (APGD-CE, APGD-T, FAB-T);
    `square`: after Square as well."""
    if gradient - square <= CHECK_MARGIN:
        return []
    return [
        f"eps={eps:g}: Square (gradient-free) lowers accuracy from {gradient:.1%}, what every "
        f"gradient attack of the suite left, to {square:.1%} (more than {CHECK_MARGIN:.0%}): "
        "the model's gradients mislead gradient attacks (masking); trust only the full suite's "
        "number, and not a gradient attack's alone"
    ]


def large_eps_warnings(numbers: dict, steps: int) -> list[str]:
    acc, eps, m = numbers["large_eps_acc"], numbers["large_eps"], numbers["large_eps_n"]
    if acc <= LARGE_EPS_MAX_ACC:
        return []
    return [
        f"eps={eps:g} (large budget check): PGD-{steps} accuracy is {acc:.1%} on the "
        f"first {m} examples, above {LARGE_EPS_MAX_ACC:.0%}; at this budget a working attack "
        "reaches ~0%: gradients are probably masked"
    ]


def _above(value: float, limit: float) -> bool:
    return math.isfinite(value) and value > limit
