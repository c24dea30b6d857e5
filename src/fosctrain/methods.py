"""Training methods. Each says how it builds its training batch (which attack, which stopping
rule, which schedule) and which loss it trains on; fosctrain.train runs them all in one loop.

    natural  clean examples
    madry    PGD-K, no stopping rule (Madry et al. 2018)
    cat      PGD whose step count grows 0 -> K over T' (curriculum AT, Cai et al. 2018)
    dat      PGD-K that stops each sample once its FOSC <= c_t (Wang et al. 2019, Algorithm 1)
    fat      PGD-K that stops a sample tau steps after it is misclassified (Zhang et al. 2020)
    trades   CE(clean) + beta * KL(clean || adversarial), KL maximized by PGD (Zhang et al. 2019)
    fast     FGSM from a random start with step 1.25 eps (Wong et al. 2020)

With `norm = "l2"` every attack is its L2 form (PGDL2: normalized-gradient steps, projection
onto the L2 ball, L2 FOSC), so DAT's threshold and `--c-max auto` work on the L2 FOSC.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fosctrain.attacks import PGD, PGDL2, AttackResult, FoscThreshold, MisclassifiedTau, Sampler
from fosctrain.attacks.engine import attack_mode, random_start
from fosctrain.config import Config
from fosctrain.errors import UserError
from fosctrain.losses import cross_entropy, kl_from_clean
from fosctrain.schedules import curriculum_steps, fat_tau, fosc_target


def pgd_class(norm: str) -> type[PGD]:
    """The PGD of a threat model: L-inf (the default) or L2."""
    return PGDL2 if norm == "l2" else PGD


class Method:
    """Madry PGD-AT; the other methods change one piece of it."""

    name = "madry"
    passes = 1  # training forward/backward passes per example

    def __init__(self, config: Config) -> None:
        self.config = config

    def attack(self, t: float) -> PGD | None:
        """The attack that makes the training batch at training time t (None: clean batch);
        Madry takes `late_steps` steps from epoch `late_from` on, when they are set."""
        c = self.config
        late = c.late_steps is not None and t >= c.late_from
        return pgd_class(c.norm)(
            eps=c.eps,
            alpha=c.step_size,
            steps=c.late_steps if late else c.steps,
            random_start=c.random_start,
            fosc_box=c.fosc_box,
        )

    def make_batch(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        t: float,
        generator: torch.Generator,
        start: Sampler = random_start,
    ) -> AttackResult | None:
        """The attack's result on (x, y) (None: train on x), random starts from `start`."""
        attack = self.attack(t)
        return None if attack is None else attack(model, x, y, generator=generator, start=start)

    def fosc_target(self, t: float) -> float:
        return math.nan

    def loss(
        self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, epoch: int
    ) -> tuple[Tensor, Tensor]:
        """Per-sample training losses (the loop averages them) and the logits on x_adv."""
        logits = model(x_adv)
        return cross_entropy(logits, y), logits


class Natural(Method):
    name = "natural"

    def attack(self, t: float) -> None:
        return None


class Curriculum(Method):
    name = "cat"

    def attack(self, t: float) -> PGD | None:
        k = curriculum_steps(t, self.config.steps, self.config.schedule_epochs)
        if k == 0:
            return None
        pgd = super().attack(t)
        pgd.steps = k
        return pgd


class Dynamic(Method):
    """DAT. c_max may be calibrated at the start of training (`calibrate`, for --c-max auto)."""

    name = "dat"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.c_max = None if config.c_max == "auto" else float(config.c_max)

    def fosc_target(self, t: float) -> float:
        return fosc_target(t, self.c_max, self.config.schedule_epochs)

    def attack(self, t: float) -> PGD:
        c = self.config
        pgd = super().attack(t)
        pgd.stop = FoscThreshold(self.fosc_target(t))
        pgd.min_steps = 1 if c.first_step_always else 0
        pgd.fosc_from_start = c.fosc_from_random_start
        return pgd

    def calibrate(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> float:
        """--c-max auto: the c_max-quantile of the FOSC after one PGD step on the initial model.

        At c_0 = c_max that fraction of the samples stops after its first step, the weakest
        examples DAT starts from, and the rest stop as soon as they reach that level; the linear
        decay to 0 then moves every sample to full PGD-K by epoch T'. Measured on the model it
        will train, so the threshold binds whatever the eps, input size or model.
        """
        pgd = Method.attack(self, 0.0)
        pgd.steps = 2
        trace = pgd(model, x, y, generator=generator).fosc_trace[1]
        self.c_max = float(torch.quantile(trace.double(), self.config.c_max_quantile))
        return self.c_max

    def loss(self, model, x, x_adv, y, epoch):
        values, logits = super().loss(model, x, x_adv, y, epoch)
        if self.config.loss_weighting and epoch > 0:
            values = values * values.detach()
        return values, logits


class Friendly(Method):
    name = "fat"

    def attack(self, t: float) -> PGD:
        c = self.config
        pgd = super().attack(t)
        pgd.stop = MisclassifiedTau(fat_tau(t, c.fat_tau, c.fat_tau_max, c.schedule_epochs))
        return pgd


class Trades(Method):
    name = "trades"
    passes = 2

    def make_batch(self, model, x, y, t, generator, start=random_start):
        with attack_mode(model), torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        pgd = self.attack(t)
        pgd.loss = "kl"
        return pgd(model, x, p_clean, generator=generator, start=start)

    def loss(self, model, x, x_adv, y, epoch):
        clean, adv = model(x), model(x_adv)
        kl = kl_from_clean(adv, F.softmax(clean, dim=1))
        return cross_entropy(clean, y) + self.config.trades_beta * kl, adv


class Fast(Method):
    name = "fast"

    def attack(self, t: float) -> PGD:
        """One step (signed, or normalized for L2) from a random start in the ball."""
        c = self.config
        return pgd_class(c.norm)(
            eps=c.eps,
            alpha=1.25 * c.eps if c.fast_alpha is None else c.fast_alpha,
            steps=1,
            random_start=True,
            fosc_box=c.fosc_box,
        )


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Natural, Method, Curriculum, Dynamic, Friendly, Trades, Fast)
}


def create_method(config: Config) -> Method:
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {sorted(METHODS)}")
    return METHODS[config.method](config)
