"""`fosc attack`: run one attack on a few test examples and show the FOSC of every step."""

from __future__ import annotations

import argparse

import torch

from fosctrain.attacks import ATTACKS, FoscThreshold, attack_class, create_attack
from fosctrain.data import DATASET_NAMES, fixed_subset, load_dataset
from fosctrain.fosc import fosc_stats
from fosctrain.models import create_model
from fosctrain.rundir import load_model
from fosctrain.threat import validate_eps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="run directory or checkpoint (default: untrained)")
    p.add_argument("--model", default="mnist-cnn", help="model name when no checkpoint is given")
    p.add_argument("--dataset", default="mnist5k", choices=DATASET_NAMES)
    p.add_argument("--data-dir")
    p.add_argument("--attack", default="pgd", choices=sorted(ATTACKS))
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--alpha", type=float)
    p.add_argument("--steps", type=int, help="steps (default: the attack's own; fgsm: 1)")
    p.add_argument("--n", type=int, default=256, help="test examples attacked")
    p.add_argument("--stop-fosc", type=float, help="stop a sample once its FOSC <= this (DAT)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    validate_eps([args.eps], attack_class(args.attack).norm)  # before any data is read
    data = load_dataset(args.dataset, args.data_dir)
    if args.checkpoint:
        model = load_model(args.checkpoint).model
    else:
        torch.manual_seed(args.seed)
        model = create_model(args.model, in_channels=data.input_shape[0]).eval()
    x, y = fixed_subset(data.x_test, data.y_test, args.n)
    stop = None if args.stop_fosc is None else FoscThreshold(args.stop_fosc)
    options = dict(eps=args.eps, alpha=args.alpha, stop=stop, seed=args.seed)
    if args.steps is not None:
        options["steps"] = args.steps
    attack = create_attack(args.attack, final_fosc=True, **options)
    result = attack(model, x, y)
    print(f"{'step':>4} {'running':>7} {'FOSC mean':>10} {'median':>10} {'p90':>10}")
    for k, row in enumerate(result.fosc_trace):
        s = fosc_stats(row)
        running = int((~torch.isnan(row)).sum())
        print(f"{k:>4} {running:>7} {s['mean']:>10.4f} {s['median']:>10.4f} {s['p90']:>10.4f}")
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        robust = (model(result.x_adv).argmax(1) == y).float().mean().item()
    print(f"clean accuracy {100 * clean:.1f}%, accuracy under attack {100 * robust:.1f}%")
    print(
        f"gradient evaluations {result.grad_evals} (mean steps {result.steps.float().mean():.2f})"
    )
    return 0
