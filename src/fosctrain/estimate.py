"""What a `fosc reproduce` plan costs: gradient evaluations per run from the configuration, times
seconds per gradient evaluation measured here (one thread) or assumed for one GPU.

A gradient evaluation is one forward + backward pass of one example. Assumptions, stated in
the --dry-run output too:
- Training: every example of every epoch costs the method's training passes plus the steps of
  the attack the method would run at that time (Method.attack); DAT and FAT stop examples
  early, so for them this is an upper bound (DAT took ~66% of Madry's on mnist5k).
- Tests during training: eval_n examples x (eval_steps + 2) per epoch, final_eval_n at the end.
- Final evaluation: ~54 per example (clean, FGSM, PGD-20, C&W-30), APGD_GRADS for APGD-CE +
  APGD-T, plus ~110 per checked example (a 40-step PGD with 2 restarts, the large-eps PGD; 256
  examples); AutoAttack (standard) AUTOATTACK_GRADS per example in all (APGD-CE, APGD-T,
  FAB-T, Square on a robust model), of which the report's APGD is reused.
- Budget checkpoints (time to robustness): one score of BUDGET_GRADS per example for every
  budget the training evaluations pass, and for the last checkpoint.
- This machine: CPU seconds per gradient evaluation of PGD steps on one thread, measured on
  a training batch of the untrained model now (CPU time, so other load does not inflate it);
  `--jobs J` divides the total by J (J free cores assumed).
- One GPU: FLOPs of a forward + backward (counted by torch) / GPU_FLOPS. Small models do not
  fill a GPU, so for the MNIST CNN this is a lower bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fosctrain.attacks import create_attack
from fosctrain.config import Config
from fosctrain.data import DATASETS
from fosctrain.evaluate import CW_STEPS, PGD_STEPS
from fosctrain.masking import CHECK_N
from fosctrain.methods import create_method
from fosctrain.models import set_layout
from fosctrain.reproduce import status
from fosctrain.rundir import build_model

AUTOATTACK_GRADS = 3500
# clean and FGSM, PGD with FOSC measured at its start and end, C&W: 54 for PGD-20 and C&W-30
EVAL_GRADS = 1 + 1 + (PGD_STEPS + 2) + CW_STEPS
# the checks' attacks add up to 100 (PGD-40 x 2, the large-eps PGD-20); 110 is the estimate as
# first stated, kept so that the plans' estimates do not move
CHECK_GRADS = 110
# APGD-CE + APGD-T (9 targets) of the final report: 796k-810k on 1,000 digits (DAT and Madry
# PGD-10 at default scale, robust accuracy ~77%)
APGD_GRADS = 800
# a budget checkpoint's score: clean, PGD-20, APGD-CE and APGD-T on 3 targets (an upper bound:
# every example robust)
BUDGET_GRADS = 1 + (PGD_STEPS + 2) + 4 * 100
GPU_FLOPS = 30e12  # assumed sustained FLOP/s of one A100/H100-class GPU (TF32 / bf16)
SAMPLES_PER_EPOCH = 20  # schedule points per epoch for iteration-unit schedules


def attack_steps(config: Config) -> float:
    """Attack evaluations per training example, summed over training (an upper bound with
    rules): its steps, and one more where the attack evaluates its last point (APGD)."""
    method = create_method(config)  # DAT before c_max auto is measured: PGD-K, no rule
    per = SAMPLES_PER_EPOCH if config.schedule_unit == "iteration" else 1
    total = 0.0
    for epoch in range(config.epochs):
        for i in range(per):
            attack = method.attack(epoch + i / per)
            total += (attack.steps + attack.final_fosc if attack is not None else 0) / per
    return total


def training_grads(config: Config) -> float:
    facts = DATASETS[config.dataset]
    n_train, n_test = facts.train, facts.test
    n = config.train_n or n_train - config.val_n
    train = n * (config.epochs * create_method(config).passes + attack_steps(config))
    tests = config.val_n * (config.eval_steps + 2) * config.epochs
    return train + tests + (config.final_eval_n or n_test) * (config.eval_steps + 2)


def evaluation_grads(n: int, checks: bool, autoattack_n: int, measure_n: int, steps: int) -> float:
    """The final report (with APGD-CE + APGD-T), the AutoAttack (which reuses the report's
    APGD), the FOSC measurement."""
    grads = n * (EVAL_GRADS + APGD_GRADS) + (min(n, CHECK_N) * CHECK_GRADS if checks else 0)
    return grads + autoattack_n * (AUTOATTACK_GRADS - APGD_GRADS) + measure_n * (steps + 1)


def budget_grads(config: Config, n: int) -> float:
    """Scoring the budget checkpoints and the last one (--budget-every), each on n examples."""
    if not config.budget_every:
        return 0.0
    checkpoints = int(training_grads(config) // config.budget_every) + 1
    return checkpoints * n * BUDGET_GRADS


@dataclass(frozen=True)
class Speed:
    """Seconds per gradient evaluation of one model: measured on this CPU, estimated on a GPU."""

    cpu_s: float
    gpu_s: float
    flops: float


def measure_speed(config: Config) -> Speed:
    """Time PGD steps (what most gradient evaluations are) on the untrained model on one thread
    (a batch of 64, or 2 for a model with over 5M parameters); count FLOPs per example."""
    # lazy: only --dry-run counts FLOPs, and the counter pulls in torch's dispatch machinery
    from torch.utils.flop_counter import FlopCounterMode

    model = set_layout(build_model(config.to_dict()), config.channels_last)
    big = sum(p.numel() for p in model.parameters()) > 5_000_000
    batch = 2 if big else config.batch_size
    x = torch.rand(batch, *DATASETS[config.dataset].shape)
    y = torch.zeros(batch, dtype=torch.long)
    pgd = create_attack("pgd", eps=config.eps, alpha=config.step_size, steps=2 if big else 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(2 if big else 3):
            start = time.process_time()
            result = pgd(model, x, y, generator=torch.Generator().manual_seed(0))
            best = min(best, (time.process_time() - start) / result.grad_evals)
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.cross_entropy(model(x), y).backward()
    finally:
        torch.set_num_threads(threads)
    flops = counter.get_total_flops() / batch
    return Speed(best, flops / GPU_FLOPS, flops)


def hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_plan(plan, jobs: int = 1) -> str:
    """The plan of a fosctrain.reproduce.Plan (runs, their state) and its time estimate."""

    lines = []
    exp, scale = plan.experiment, plan.scale
    lines.append(f"{exp.name} at scale {scale.name}: {exp.description}")
    lines.append(f"scale: {scale.description}; out: {plan.out}")
    speeds: dict[str, Speed] = {}
    total_grads = cpu = gpu = 0.0
    header = f"{'run':<28} {'state':<9} {'grad evals':>12} {'1 CPU thread':>13} {'1 GPU':>8}"
    lines += [header, "-" * len(header)]
    for run in plan.runs:
        config = plan.config(run)
        if config.model not in speeds:
            speeds[config.model] = measure_speed(config)
        speed = speeds[config.model]
        s = run.spec
        grads = training_grads(config) + evaluation_grads(
            s.n, s.checks, s.autoattack_n, s.measure_n, s.measure_steps
        )
        grads += budget_grads(config, s.n) if s.budgets else 0.0
        total_grads += grads
        cpu += grads * speed.cpu_s
        gpu += grads * speed.gpu_s
        lines.append(
            f"{run.name:<28} {status(run):<9} {grads:>12,.0f} "
            f"{hours(grads * speed.cpu_s):>13} {hours(grads * speed.gpu_s):>8}"
        )
    for model, s in speeds.items():
        lines.append(
            f"{model}: {1e3 * s.cpu_s:.3g} ms per gradient evaluation on one CPU thread here "
            f"(measured), {s.flops / 1e6:.3g} MFLOP each -> {1e6 * s.gpu_s:.3g} us on one GPU "
            f"at an assumed {GPU_FLOPS / 1e12:g} TFLOP/s"
        )
    lines.append(
        f"total: {len(plan.runs)} runs, {total_grads:,.0f} gradient evaluations; "
        f"this machine with --jobs {jobs}: ~{hours(cpu / jobs)}; one GPU: ~{hours(gpu)}"
    )
    lines.append(
        "assumptions: DAT/FAT at their upper bound of K steps; AutoAttack "
        f"{AUTOATTACK_GRADS} per example; --jobs J needs J free cores; GPU time from FLOPs "
        "(a lower bound for small models); see fosctrain.estimate"
    )
    return "\n".join(lines)
