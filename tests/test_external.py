"""Models trained elsewhere (`--factory MODULE:FUNCTION --weights FILE`) through the CLI's main:
eval and measure work on a tiny factory module written into tmp_path, the numbers are the model's
own, and every bad factory, weights file or option combination is one stderr line, exit 2."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_EVAL, one_error_line
from safetensors.torch import save_file
from torch import nn

from fosctrain.checkpoint import file_sha256, save_checkpoint
from fosctrain.cli import main
from fosctrain.data import fixed_subset, load_dataset
from fosctrain.external import load_external_model

MODULE = "tiny_external_nets"
FACTORY = f"{MODULE}:make_net"
SOURCE = """
import torch
from torch import nn


def make_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def make_conv():
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


def make_wide():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 12))


def boom():
    raise ValueError("no GPU\\nhere")


def not_a_model():
    return 42


NOT_CALLABLE = 3
"""


@pytest.fixture
def factory_dir(tmp_path, monkeypatch) -> Path:
    """tmp_path holding MODULE (and a module that fails on import), importable."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    (tmp_path / "broken_external_nets.py").write_text("import torch\nraise RuntimeError('oops')\n")
    monkeypatch.syspath_prepend(tmp_path)
    yield tmp_path
    for name in (MODULE, "broken_external_nets"):
        sys.modules.pop(name, None)


def nearest_mean_state() -> dict[str, torch.Tensor]:
    """Weights for make_net that classify well: the nearest class mean of mnist5k's training
    images (argmax of x . mu_k - |mu_k|^2 / 2), so a model left untrained would show."""
    ds = load_dataset("mnist5k")
    x = ds.x_train.flatten(1)
    means = torch.stack([x[ds.y_train == k].mean(0) for k in range(10)])
    return {"1.weight": means.contiguous(), "1.bias": -0.5 * (means**2).sum(1)}


@pytest.fixture
def weights(factory_dir) -> Path:
    path = factory_dir / "net.safetensors"
    save_file(nearest_mean_state(), path)
    return path


def external_args(verb: str, weights: Path, out: Path, *extra: str) -> list[str]:
    fast = [*FAST_EVAL, "--autoattack", "none"] if verb == "eval" else ["--n", "8", "--steps", "2"]
    return [verb, "--factory", FACTORY, "--weights", str(weights), "--out", str(out), *fast, *extra]


DATA = ("--dataset", "mnist5k", "--eps", "0.3")


# ---------------------------------------------------------------- it works


def test_eval_of_an_external_model(weights, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(external_args("eval", weights, out, *DATA, "--which", "last")) == 0
    report = json.loads((out / "eval.json").read_text())
    ds = load_dataset("mnist5k")
    x, y = fixed_subset(ds.x_test, ds.y_test, 16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    model.load_state_dict(nearest_mean_state())
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    clean = report["results"][0]["clean"]
    assert clean["n"] == 16 and clean["correct"] == correct and clean["acc"] == correct / 16
    assert correct >= 10  # the file's weights, not a fresh initialization
    assert report["settings"]["eps_list"] == [0.3]
    meta = report["meta"]
    assert meta["factory"] == FACTORY and meta["model"] == FACTORY
    assert meta["weights"] == str(weights) and meta["dataset"] == "mnist5k"
    assert meta["weights_sha256"] == file_sha256(weights)
    assert "worst_case" in capsys.readouterr().out


def test_measure_of_an_external_model(weights, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(external_args("measure", weights, out, *DATA)) == 0
    assert len((out / "measure.csv").read_text().splitlines()) == 1 + 3
    assert (out / "measure.png").is_file()
    assert "FOSC mean" in capsys.readouterr().out


def test_library_loads_from_the_current_directory_and_a_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "cwd_external_nets.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert str(tmp_path) not in path_before  # importable only as the current directory
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    save_checkpoint(tmp_path, "ours", model=model)
    try:
        loaded = load_external_model("cwd_external_nets:make_net", tmp_path / "ours")
    finally:
        sys.modules.pop("cwd_external_nets", None)
    assert sys.path == path_before
    assert not loaded.model.training and loaded.source == tmp_path / "ours.safetensors"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    assert loaded.config["weights_sha256"] == file_sha256(tmp_path / "ours.safetensors")


def test_pickle_weights_only_with_allow_pickle(factory_dir, tmp_path, capsys):
    pt = factory_dir / "net.pt"
    torch.save(nearest_mean_state(), pt)
    out = tmp_path / "results"
    assert main(external_args("eval", pt, out, *DATA)) == 2
    line = one_error_line(capsys)
    assert "net.pt" in line and "safetensors" in line and "--allow-pickle" in line
    assert not out.exists()
    assert main(external_args("eval", pt, out, *DATA, "--allow-pickle")) == 0
    assert json.loads((out / "eval.json").read_text())["meta"]["weights"] == str(pt)


# ---------------------------------------------------------------- bad input, one line each


def save_state(path: Path, factory: str, extra: dict | None = None) -> Path:
    """The state dict of a fresh `factory` model (plus `extra` tensors) saved at `path`."""
    module, fn = factory.split(":")
    state = getattr(importlib.import_module(module), fn)().state_dict()
    save_file({**state, **(extra or {})}, path)
    return path


def absent(d: Path) -> Path:
    return d / "absent.safetensors"


def junk(d: Path) -> Path:
    (d / "junk.safetensors").write_bytes(b"\x10" + bytes(20))
    return d / "junk.safetensors"


def conv(d: Path) -> Path:
    return save_state(d / "conv.safetensors", f"{MODULE}:make_conv")


def wide(d: Path) -> Path:
    return save_state(d / "wide.safetensors", f"{MODULE}:make_wide")


def extra_key(d: Path) -> Path:
    return save_state(d / "plus.safetensors", FACTORY, {"extra": torch.zeros(1)})


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (f"{MODULE}.make_net", "expected MODULE:FUNCTION"),
        (f"{MODULE}:", "expected MODULE:FUNCTION"),
        ("no_such_module_anywhere:make_net", "no module named 'no_such_module_anywhere'"),
        ("broken_external_nets:make_net", "importing broken_external_nets failed (RuntimeError"),
        (f"{MODULE}:make_nett", "has no attribute 'make_nett'"),
        (f"{MODULE}:NOT_CALLABLE", "NOT_CALLABLE (of type int) is not callable"),
        (f"{MODULE}:boom", "boom() raised ValueError: no GPU here"),
        (f"{MODULE}:not_a_model", "returned a value of type int, not a torch nn.Module"),
    ],
)
@pytest.mark.parametrize("verb", ["eval", "measure"])
def test_bad_factory_is_one_line(weights, tmp_path, capsys, verb, factory, match):
    args = external_args(verb, weights, tmp_path / "out", *DATA)
    args[args.index(FACTORY)] = factory
    assert main(args) == 2
    assert match in one_error_line(capsys)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (absent, "does not exist"),
        (junk, "junk.safetensors"),
        (conv, f"weights do not fit model '{FACTORY}' (missing key 1.weight (and 1 more))"),
        (wide, "size mismatch for 1.weight"),
        (extra_key, "unexpected key extra"),
    ],
)
@pytest.mark.parametrize("verb", ["eval", "measure"])
def test_bad_weights_are_one_line(factory_dir, tmp_path, capsys, verb, make, match):
    path = make(factory_dir)
    assert main(external_args(verb, path, tmp_path / "out", *DATA)) == 2
    line = one_error_line(capsys)
    assert match in line and path.name in line


@pytest.mark.parametrize(
    ("drop", "target", "match"),
    [
        ("--eps", None, "a --factory model has no eps; give --eps"),
        ("--dataset", None, "a --factory model names no dataset; give --dataset"),
        ("--out", None, "--out is needed with --factory"),
        ("--weights", None, "--factory and --weights go together"),
        ("--factory", None, "--factory and --weights go together"),
        (None, "some-run", "not both"),
    ],
)
@pytest.mark.parametrize("verb", ["eval", "measure"])
def test_bad_option_combinations_are_one_line(weights, tmp_path, capsys, verb, drop, target, match):
    args = external_args(verb, weights, tmp_path / "out", *DATA)
    if target is not None:
        args.insert(1, target)
    if drop is not None:
        i = args.index(drop)
        del args[i : i + 2]
    assert main(args) == 2
    assert match in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["eval", "measure"])
def test_no_model_given_is_one_line(tmp_path, capsys, verb):
    assert main([verb, "--eps", "0.3"]) == 2
    assert "give CHECKPOINT_OR_RUN, or" in one_error_line(capsys)
    assert main([verb, str(tmp_path), "--allow-pickle"]) == 2
    assert "--allow-pickle goes with --factory" in one_error_line(capsys)
