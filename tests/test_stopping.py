"""Stopping rules (fosctrain.attacks.stopping): each rule's per-sample decisions on small
hand-made tensors, fed the still-running samples only as the engine does (FOSC threshold,
FAT's misclassified-tau, DAT's batch quantile), and the batch-quantile rule inside PGD: the same
compacted or not, q = 0 as full PGD, and free of BatchNorm's statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_model
from torch import nn

from fosctrain.attacks import PGD, BatchQuantile, FoscThreshold, MisclassifiedTau
from fosctrain.models import create_model

# --------------------------------------------------------------------------- FOSC threshold


def test_fosc_threshold_semantics():
    rule = FoscThreshold(0.5)
    rule.reset(4, torch.device("cpu"))
    f = torch.tensor([0.4, 0.5, 0.500001, float("nan")])
    idx = torch.arange(4)
    logits = torch.zeros(4, 3)
    out = rule(0, idx, f, logits, torch.zeros(4, dtype=torch.long), False)
    assert out.tolist() == [True, True, False, False]
    edge = torch.tensor([0.0, -1e-9, 1e-9, 2.0])
    assert FoscThreshold(0.0)(0, idx, edge, logits, idx, False).tolist() == [
        True,
        True,
        False,
        False,
    ]


# -------------------------------------------------------------------------- misclassified tau (FAT)

# Rows: calls (PGD steps); columns: samples; 1 = misclassified at that evaluation.
FOOLED = [
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [1, 0, 0, 1],
    [1, 1, 0, 1],
    [1, 0, 0, 1],
    [1, 1, 0, 1],
]


def _drive(rule, fooled, targeted=False):
    """Feed the rule the running samples only, as the engine does; return stop step each."""
    n = len(fooled[0])
    rule.reset(n, torch.device("cpu"))
    running = torch.ones(n, dtype=torch.bool)
    stop_at = [None] * n
    y = torch.zeros(n, dtype=torch.long)  # true class (or target when targeted) 0
    for step, row in enumerate(fooled):
        idx = running.nonzero().squeeze(1)
        wrong = torch.tensor(row, dtype=torch.bool)[idx]
        if targeted:
            wrong = ~wrong  # predicting class 0 = the target = success
        logits = torch.stack([(~wrong).float(), wrong.float()], 1)  # argmax 0 iff correct
        if targeted:
            logits = logits.flip(1)
        halt = rule(step, idx, torch.zeros(idx.numel()), logits, y[idx], targeted)
        for i in idx[halt].tolist():
            stop_at[i] = step
        running[idx[halt]] = False
    return stop_at


def test_misclassified_tau_zero_stops_at_first_misclassified():
    assert _drive(MisclassifiedTau(0), FOOLED) == [0, 1, None, 2]


def test_misclassified_tau_two_needs_two_more_misclassified_evaluations():
    # Sample 0: fooled at 0, 1, 2 -> stops at 2; sample 1: fooled at 1, 3, 5 -> 5;
    # sample 3: fooled at 2, 3, 4 -> 4.
    assert _drive(MisclassifiedTau(2), FOOLED) == [2, 5, None, 4]
    assert _drive(MisclassifiedTau(1), FOOLED) == [1, 3, None, 3]


def test_misclassified_tau_targeted_counts_hitting_the_target():
    rule = MisclassifiedTau(0)
    rule.reset(2, torch.device("cpu"))
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    target = torch.tensor([1, 1])
    assert rule(0, torch.arange(2), torch.zeros(2), logits, target, True).tolist() == [True, False]
    assert rule(0, torch.arange(2), torch.zeros(2), logits, target, False).tolist() == [
        False,
        True,
    ]


# --------------------------------------------------------------------------- batch quantile


def test_batch_quantile_fixes_its_target_at_the_first_check():
    """q = 0.3 of (0.5, 0.1, 0.4, 0.2, 0.3): sorted, position 0.3 * 4 = 1.2 lies between 0.2
    and 0.3, so the target is 0.2 + 0.2 * 0.1 = 0.22; later checks (on the survivors only)
    compare with it, and a reset (a new batch) draws a new one."""
    rule = BatchQuantile(0.3)
    rule.reset(5, torch.device("cpu"))
    assert rule.threshold is None
    y, logits = torch.zeros(5, dtype=torch.long), torch.zeros(5, 3)
    fosc = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3])
    first = rule(1, torch.arange(5), fosc, logits, y, False)
    assert rule.threshold == pytest.approx(0.22)
    assert first.tolist() == [False, True, False, True, False]
    idx = torch.tensor([0, 2, 4])  # the survivors, one step later
    later = rule(2, idx, torch.tensor([0.21, 0.23, 0.05]), logits[idx], y[idx], False)
    assert later.tolist() == [True, False, True]  # against 0.22, not their own quantile
    assert rule.threshold == pytest.approx(0.22)
    rule.reset(5, torch.device("cpu"))
    assert rule.threshold is None
    again = rule(1, torch.arange(5), fosc * 10, logits, y, False)
    assert rule.threshold == pytest.approx(2.2) and again.tolist() == first.tolist()


@pytest.mark.parametrize(
    ("q", "threshold", "stops"),
    [
        (0.0, 0.0, [False, False, False, False]),  # target 0, not the minimum 0.1
        (0.5, 0.25, [False, True, True, False]),  # halfway between 0.2 and 0.3
        (1.0, 0.4, [True, True, True, True]),
    ],
)
def test_batch_quantile_target_by_hand(q, threshold, stops):
    rule = BatchQuantile(q)
    rule.reset(4, torch.device("cpu"))
    fosc = torch.tensor([0.4, 0.1, 0.2, 0.3])
    got = rule(0, torch.arange(4), fosc, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), False)
    assert rule.threshold == pytest.approx(threshold)
    assert got.tolist() == stops


@pytest.mark.parametrize(("q", "min_steps"), [(0.3, 0), (0.6, 1), (0.5, 2)])
def test_batch_quantile_rule_is_the_same_compacted_or_not(q, min_steps, digits):
    x, y = digits
    model = fresh_model().eval()
    results = []
    for compact in (True, False):
        rule = BatchQuantile(q)
        pgd = PGD(eps=0.3, steps=6, stop=rule, min_steps=min_steps, compact=compact)
        res = pgd(model, x[:40], y[:40], generator=torch.Generator().manual_seed(4))
        first = res.fosc_trace[min_steps].double()
        assert rule.threshold == pytest.approx(float(torch.quantile(first, q)))
        assert (res.steps[res.stopped] >= min_steps).all()
        results.append((res, rule.threshold))
    (a, ta), (b, tb) = results
    assert ta == tb
    assert a.steps.tolist() == b.steps.tolist()
    assert torch.equal(a.x_adv, b.x_adv)
    assert len(set(a.steps.tolist())) > 1  # samples left at different steps: compaction ran


def test_batch_quantile_zero_is_full_pgd(digits):
    x, y = digits
    rule = BatchQuantile(0.0)
    res = PGD(eps=0.3, steps=3, stop=rule)(fresh_model().eval(), x[:16], y[:16])
    assert rule.threshold == 0 and res.steps.tolist() == [3] * 16


def _warmed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The same weights with BatchNorm's running statistics set to the data's (as after the
    first epoch's forward passes), not the fresh mean 0 / var 1."""
    warm = create_model("mnist-cnn")
    warm.load_state_dict(model.state_dict())
    for m in warm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes below
    warm.train()
    with torch.no_grad():
        warm(x)
    return warm.eval()


def test_batch_quantile_target_is_free_of_batchnorm_statistics(digits):
    """Fresh BatchNorm statistics change the FOSC the rule reads several-fold, and with it an
    absolute c_max measured on them; the batch-quantile target stops the same share of every
    batch at the first check whatever the statistics (issue 13: fresh BN must not skew it)."""
    x, y = digits
    fresh = fresh_model().eval()
    warm = _warmed(fresh, x)
    medians, shares = [], []
    for model in (fresh, warm):
        rule = BatchQuantile(0.5)
        res = PGD(eps=0.3, steps=4, stop=rule, min_steps=1)(
            model, x, y, generator=torch.Generator().manual_seed(2)
        )
        medians.append(float(res.fosc_trace[1].median()))
        shares.append(float((res.steps == 1).double().mean()))
    assert max(medians) / min(medians) > 3  # what an absolute c_max would be calibrated on
    assert shares == [pytest.approx(0.5, abs=1 / len(y))] * 2
