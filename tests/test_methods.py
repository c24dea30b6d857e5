"""The methods as a drop-in API: docs/API.md's example runs, DAT.loss gives the training loop's
batch, every method works in a user's loop, options come from Config, hooks round-trip."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from fosctrain import config as config_mod
from fosctrain import methods
from fosctrain import train as train_mod
from fosctrain.config import Config, resolve
from fosctrain.data import load_mnist5k
from fosctrain.errors import UserError
from fosctrain.methods import DAT, METHODS, Info, create_method
from fosctrain.models import create_model

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"
MARK = "<!-- drop-in-example -->"


@pytest.fixture(scope="module")
def batch():
    data = load_mnist5k()
    return data.x_train[:48], data.y_train[:48]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_api_doc_drop_in_example_runs(one_thread, capsys):
    """Exactly docs/API.md's code block between the markers, executed."""
    parts = API_DOC.read_text().split(MARK)
    assert len(parts) == 3, "docs/API.md must hold one drop-in example between two markers"
    code = re.fullmatch(r"\s*```python\n(.*)```\s*", parts[1], re.S)
    assert code is not None
    namespace: dict = {}
    exec(compile(code.group(1), str(API_DOC), "exec"), namespace)
    info, loss, model = namespace["info"], namespace["loss"], namespace["model"]
    assert isinstance(info, Info) and math.isfinite(loss.item())
    assert 1 <= info.steps_mean <= 10 and 0 < info.fosc_median < math.inf
    assert info.grad_evals == info.attack_grad_evals + 128  # one training pass per example
    assert info.fosc_target == pytest.approx(0.25)  # c_t at epoch 1 of T' = 2 from 0.5
    assert model.training
    assert capsys.readouterr().out.count("epoch") == 2


def test_dat_loss_gives_the_loops_training_batch(tmp_path, batch):
    """DAT built from keywords, in a plain loop with Adam, takes the very optimizer step the
    training loop's train_batch takes with the same generator: equal weights afterwards."""
    x, y = batch
    cfg = resolve(overrides=dict(method="dat", c_max=1.0, steps=4, t_prime=3, epochs=4))
    tr = train_mod.build_trainer(cfg, tmp_path / "r", progress=False)
    model = copy.deepcopy(tr.model)
    generator = torch.Generator().set_state(tr.generator.get_state())
    stats = train_mod.train_batch(tr, x, y, 1.0, 1)

    dat = DAT(c_max=1.0, steps=4, t_prime=3)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss, info = dat.loss(model, x, y, 1, generator=generator)
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert loss.item() == pytest.approx(stats["loss_sum"] / len(y), rel=1e-6)
    assert info.steps_mean == stats["steps_sum"] / len(y)
    assert info.grad_evals == stats["attack_evals"] + stats["train_evals"]
    assert info.fosc_target == pytest.approx(2 / 3)
    assert 0 < info.steps_mean < 4  # the threshold stopped some samples early
    ours = model.state_dict()
    for name, weights in tr.model.state_dict().items():
        assert torch.equal(weights, ours[name]), name
    tr.lock.release()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_works_through_the_drop_in_api(name, batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("mnist-cnn")
    method = METHODS[name](eps=0.3, steps=3, c_max=0.3, t_prime=2)
    loss, info = method.loss(model, x, y, 1.5, generator=torch.Generator().manual_seed(0))
    assert model.training  # back in train mode for the training forward
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert info.grad_evals == info.attack_grad_evals + method.passes * len(y)
    if name == "natural":
        assert info.attack_grad_evals == 0 and info.steps_mean == 0
        assert math.isnan(info.fosc_mean)
    else:
        assert info.attack_grad_evals > 0 and 1 <= info.steps_mean <= 3
        assert info.fosc_p90 >= info.fosc_median >= 0
    assert math.isnan(info.fosc_target) != (name == "dat")


def test_methods_are_registered_once_by_the_configs_names():
    assert set(METHODS) == set(config_mod.METHODS)
    expected = {
        "natural": "Natural",
        "madry": "Madry",
        "cat": "CAT",
        "dat": "DAT",
        "fat": "FAT",
        "trades": "TRADES",
        "fast": "FastAT",
    }
    for name, cls in expected.items():
        method = create_method(resolve(overrides={"method": name}))
        assert type(method).__name__ == cls and method.name == name
    assert methods.Method not in METHODS.values()  # the base is no method of its own


def test_options_are_config_fields_checked_like_configs():
    dat = DAT(eps=0.1, c_max=0.5, t_prime=40)
    assert (dat.config.eps, dat.c_max, dat.config.schedule_epochs) == (0.1, 0.5, 40)
    assert dat.config.method == "dat" and dat.config.step_size == pytest.approx(0.05)
    assert (dat.config.steps, DAT(eps=0.1, steps=10).config.step_size) == (5, pytest.approx(0.025))
    with pytest.raises(UserError, match="unknown option"):
        DAT(epsilon=0.3)
    with pytest.raises(UserError, match="eps"):
        DAT(eps=-1.0)
    with pytest.raises(UserError, match="cannot be built"):
        DAT(resolve(overrides={"method": "madry"}))


def test_dat_auto_c_max_is_calibrated_on_the_first_batch_and_kept_in_its_state(batch):
    x, y = batch
    dat = DAT(steps=3, c_max="auto")
    assert dat.c_max is None and dat.extra_metrics() == {"c_max": None}
    dat.loss(create_model("mnist-cnn"), x, y, 0, generator=torch.Generator().manual_seed(0))
    assert dat.c_max > 0 and dat.state() == {"c_max": dat.c_max}
    again = DAT(steps=3, c_max="auto")
    again.load_state(dat.state())
    assert again.c_max == dat.c_max
    assert again.calibrate(None, x, y, None) is None  # already calibrated: nothing to do
    madry = METHODS["madry"]()
    assert madry.state() == {} and madry.extra_metrics() == {}
    assert madry.calibrate(None, x, y, None) is None


@pytest.mark.parametrize(
    ("preset", "options", "steps", "step_size"),
    [
        (None, {}, 5, 0.15),  # fosc train's default: DAT on PGD-5 of eps/2
        (None, {"eps": 0.1}, 5, 0.05),
        (None, {"steps": 10}, 10, 0.075),  # a given K keeps the step rule eps/4
        (None, {"steps": 5}, 5, 0.075),
        (None, {"alpha": 0.1}, 5, 0.1),
        (None, {"method": "madry"}, 10, 0.075),  # every other method: PGD-10 of eps/4
        (None, {"method": "fat"}, 10, 0.075),
        ("mnist-paper", {}, 10, 0.075),  # the paper's presets keep the paper's attack
        ("cifar10-wrn-paper", {"data_dir": "x"}, 10, 0.031 / 4),
    ],
)
def test_dat_sets_its_own_attack_budget_where_nothing_else_does(preset, options, steps, step_size):
    config = resolve(preset, None, options)
    assert (config.steps, config.step_size) == (steps, pytest.approx(step_size))


def test_dat_budget_from_a_toml_file_and_the_python_api(tmp_path):
    toml = tmp_path / "dat.toml"
    toml.write_text("steps = 7\n")
    assert (resolve(None, str(toml), {}).steps, resolve(None, str(toml), {}).alpha) == (7, None)
    assert (DAT().config.steps, DAT().config.alpha) == (5, pytest.approx(0.15))
    assert DAT(Config()).config.steps == 10  # a Config given whole is taken as it is
