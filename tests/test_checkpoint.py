"""Checkpoints: exact round trips, damage detection, rotation and crash safety, safe loading."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import assert_one_line_error, assert_same_run, run_cli, truncate_half
from torch import nn

from fosctrain import checkpoint as ck
from fosctrain.checkpoint import (
    CheckpointError,
    ConfigMismatchError,
    file_sha256,
    load_checkpoint,
    load_latest_valid,
    restore,
    save_checkpoint,
)
from fosctrain.errors import UserError
from fosctrain.weights import load_weights


class Opaque:
    """An arbitrary object: a .pt file holding it must never be unpickled."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))


def train_steps(model, optimizer, steps: int) -> None:
    """A few steps that draw their data from the global torch RNG (so RNG state matters)."""
    model.train()
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8)
        y = torch.randint(0, 5, (6,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def setup(kind: str = "sgd", steps: int = 3):
    torch.manual_seed(0)
    model = make_model()
    optimizer = make_optimizer(kind, model)
    train_steps(model, optimizer, steps)
    return model, optimizer


def assert_same(a, b) -> None:
    """Deep equality where tensors must match exactly (dtype, shape, values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def save(directory, name="last", step=0, **kwargs):
    model, optimizer = kwargs.pop("parts", None) or setup()
    return save_checkpoint(
        directory,
        name,
        model=model,
        optimizer=optimizer,
        state={"epoch": step, "step": step},
        **kwargs,
    )


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_round_trip_restores_everything_exactly(tmp_path, kind):
    model, optimizer = setup(kind)
    gen = torch.Generator().manual_seed(7)
    gen.manual_seed(123)
    random.seed(5)
    state = {
        "epoch": 3,
        "step": 42,
        "metrics": {"acc": 0.5, "loss": float("nan"), "history": [1.0, 2.5]},
        "torch_rng": torch.get_rng_state(),
        "gen_rng": gen.get_state(),
        "py_rng": random.getstate(),
        "np_gen": np.random.default_rng(3).bit_generator.state,
    }
    save_checkpoint(
        tmp_path,
        "last",
        model=model,
        optimizer=optimizer,
        state=state,
        config_hash="abc123",
    )

    loaded = load_checkpoint(tmp_path, "last", expected_config_hash="abc123")
    torch.manual_seed(99)
    model2 = make_model()
    optimizer2 = make_optimizer(kind, model2)
    restore(loaded, model2, optimizer2)

    assert_same(model.state_dict(), model2.state_dict())
    assert model2[1].num_batches_tracked.item() == 3
    assert_same(optimizer.state_dict(), optimizer2.state_dict())

    got = loaded.state()
    assert got["epoch"] == 3 and got["step"] == 42
    assert got["metrics"]["acc"] == 0.5 and np.isnan(got["metrics"]["loss"])
    assert torch.equal(got["torch_rng"], state["torch_rng"])
    assert torch.equal(got["gen_rng"], state["gen_rng"])
    assert got["py_rng"] == state["py_rng"]
    assert got["np_gen"] == state["np_gen"]
    random.setstate(got["py_rng"])
    gen2 = torch.Generator()
    gen2.set_state(got["gen_rng"])
    assert torch.equal(torch.rand(4, generator=gen2), torch.rand(4, generator=gen))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_continuing_after_restore_is_bit_identical(tmp_path, kind):
    model, optimizer = setup(kind)
    save_checkpoint(
        tmp_path,
        "last",
        model=model,
        optimizer=optimizer,
        state={"torch_rng": torch.get_rng_state()},
    )
    train_steps(model, optimizer, 4)

    loaded = load_checkpoint(tmp_path, "last")
    torch.manual_seed(1234)
    model2 = make_model()
    optimizer2 = make_optimizer(kind, model2)
    restore(loaded, model2, optimizer2)
    torch.set_rng_state(loaded.state()["torch_rng"])
    train_steps(model2, optimizer2, 4)

    assert_same(model.state_dict(), model2.state_dict())
    assert_same(optimizer.state_dict(), optimizer2.state_dict())


def test_files_are_safetensors_and_json_never_pickle(tmp_path):
    path = save(tmp_path, config_hash="cafe")
    assert path == tmp_path / "last.safetensors"
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["config_hash"] == "cafe"
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "model/0.weight" in keys and "model/1.num_batches_tracked" in keys
    assert "optim/0/momentum_buffer" in keys

    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["sha256"] == file_sha256(path)
    assert meta["size"] == len(raw)
    assert sorted(meta["tensor_keys"]) == sorted(keys)
    assert meta["config_hash"] == "cafe"
    assert meta["state"] == {"epoch": 0, "step": 0}
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1)
    assert meta["fosctrain_version"] and meta["created"]


# --------------------------------------------------------------------------- damage


def flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def expect_error(tmp_path, fragment, filename, name="last"):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, name)
    message = str(info.value)
    assert "\n" not in message
    assert filename in message and fragment in message, message
    assert isinstance(info.value, UserError)


def test_truncated_tensor_file(tmp_path):
    path = save(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(tmp_path, "truncated", "last.safetensors")


def test_flipped_byte(tmp_path):
    path = save(tmp_path)
    flip_byte(path)
    expect_error(tmp_path, "checksum mismatch", "last.safetensors")


def test_missing_json(tmp_path):
    save(tmp_path)
    (tmp_path / "last.json").unlink()
    expect_error(tmp_path, "missing", "last.json")


def test_missing_everything(tmp_path):
    expect_error(tmp_path, "no checkpoint", "last.safetensors")


def test_json_garbage(tmp_path):
    save(tmp_path)
    (tmp_path / "last.json").write_bytes(b"{not json\xff")
    expect_error(tmp_path, "not valid JSON", "last.json")


def test_json_from_another_save(tmp_path):
    save(tmp_path, "a", step=1)
    save(tmp_path, "b", parts=setup(steps=2))
    os.replace(tmp_path / "b.json", tmp_path / "a.json")
    with pytest.raises(CheckpointError, match="a.safetensors") as info:
        load_checkpoint(tmp_path, "a")
    assert "different saves" in str(info.value)


def test_garbage_tensor_file_with_matching_json(tmp_path):
    save(tmp_path)
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    (tmp_path / "last.safetensors").write_bytes(garbage)
    meta = json.loads((tmp_path / "last.json").read_text())
    meta.update(size=len(garbage), sha256=file_sha256(tmp_path / "last.safetensors"))
    (tmp_path / "last.json").write_text(json.dumps(meta))
    expect_error(tmp_path, "not a safetensors file", "last.safetensors")


def test_config_hash_mismatch(tmp_path):
    save(tmp_path, config_hash="aaaa")
    with pytest.raises(ConfigMismatchError) as info:
        load_checkpoint(tmp_path, "last", expected_config_hash="bbbb")
    message = str(info.value)
    assert "last.safetensors" in message and "different configuration" in message
    assert "aaaa != bbbb" in message
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, UserError)


def test_restore_into_wrong_model_is_a_checkpoint_error(tmp_path):
    save(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        restore(load_checkpoint(tmp_path, "last"), nn.Linear(3, 3))


# ---------------------------------- a real run's damaged checkpoints, through `fosc train --resume`


@pytest.mark.usefixtures("restore_torch_globals")
@pytest.mark.parametrize(
    "damage",
    [truncate_half, lambda path: flip_byte(path, path.stat().st_size // 2)],
    ids=["truncated", "flipped-byte"],
)
def test_damaged_last_falls_back_to_prev_with_a_warning(baseline, finished, capsys, damage):
    damage(finished / "last.safetensors")
    rc, _, err = run_cli(capsys, ["train", "--resume", finished, "--no-progress"])
    assert rc == 0, err
    assert "fosc: warning: skipped checkpoint 'last'" in err
    assert "Traceback" not in err
    # last-prev is the state one batch before the end: replaying it gives the same run.
    assert_same_run(baseline, finished)


@pytest.mark.usefixtures("restore_torch_globals")
def test_damaged_last_and_prev_is_one_clear_line(finished, capsys):
    truncate_half(finished / "last.safetensors")
    (finished / "last-prev.json").write_text("{ not json")
    rc, _, err = run_cli(capsys, ["train", "--resume", finished, "--no-progress"])
    assert_one_line_error(rc, err, "no valid checkpoint", "last-prev")


@pytest.mark.usefixtures("restore_torch_globals")
def test_checkpoint_of_another_config_is_refused_not_fallen_back_from(finished, capsys):
    config = json.loads((finished / "config.json").read_text())
    config["lr"] = 0.02
    # The checkpoints now claim the old configuration, config.json the new one.
    (finished / "config.json").write_text(json.dumps(config))
    rc, _, err = run_cli(capsys, ["train", "--resume", finished, "--no-progress"])
    assert_one_line_error(rc, err, "different configuration", "last.safetensors")
    assert "warning" not in err


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_previous(tmp_path):
    save(tmp_path, step=1, parts=setup(steps=1))
    save(tmp_path, step=2, parts=setup(steps=2))
    last = load_checkpoint(tmp_path, "last")
    prev = load_checkpoint(tmp_path, "last-prev")
    assert last.state()["step"] == 2 and prev.state()["step"] == 1
    assert not torch.equal(last.tensors["model/0.weight"], prev.tensors["model/0.weight"])
    assert last.meta["sha256"] != prev.meta["sha256"]
    assert not os.path.samefile(last.path, prev.path)

    ckpt, warnings = load_latest_valid(tmp_path)
    assert ckpt.state()["step"] == 2 and warnings == []

    flip_byte(tmp_path / "last.safetensors")
    ckpt, warnings = load_latest_valid(tmp_path)
    assert ckpt.state()["step"] == 1 and ckpt.path.name == "last-prev.safetensors"
    assert len(warnings) == 1 and "last.safetensors" in warnings[0]

    (tmp_path / "last-prev.json").write_text("garbage")
    with pytest.raises(CheckpointError) as info:
        load_latest_valid(tmp_path)
    assert "last.safetensors" in str(info.value) and "last-prev.json" in str(info.value)


def test_keep_previous_false_does_not_rotate(tmp_path):
    save(tmp_path, step=1)
    save(tmp_path, step=2, keep_previous=False)
    assert not (tmp_path / "last-prev.json").exists()
    assert load_checkpoint(tmp_path, "last").state()["step"] == 2


def test_config_mismatch_does_not_fall_back(tmp_path):
    save(tmp_path, step=1, config_hash="good")
    save(tmp_path, step=2, config_hash="other")
    with pytest.raises(ConfigMismatchError):
        load_latest_valid(tmp_path, expected_config_hash="good")
    ckpt, _ = load_latest_valid(tmp_path, expected_config_hash="other")
    assert ckpt.state()["step"] == 2


def test_crash_between_tensor_and_json_write(tmp_path, monkeypatch):
    save(tmp_path, step=1, parts=setup(steps=1))

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(ck, "atomic_write_json", crash)
        with pytest.raises(OSError, match="simulated crash"):
            save(tmp_path, step=2, parts=setup(steps=2))
    ckpt, warnings = load_latest_valid(tmp_path)
    assert ckpt.state()["step"] == 1 and ckpt.path.name == "last-prev.safetensors"
    assert warnings and "checksum" in warnings[0]

    save(tmp_path, step=3, parts=setup(steps=3))
    ckpt, warnings = load_latest_valid(tmp_path)
    assert ckpt.state()["step"] == 3 and warnings == []
    assert load_checkpoint(tmp_path, "last-prev").state()["step"] == 1


@pytest.mark.parametrize("crash_at", range(5))
def test_a_valid_pair_survives_a_crash_at_any_rename(tmp_path, monkeypatch, crash_at):
    """Crash at the k-th rename/link of a save: the newest or the older save must still load."""
    parts = setup(steps=1)
    save(tmp_path, step=1, parts=parts)
    save(tmp_path, step=2, parts=parts)
    calls = {"n": 0}

    def failing(real):
        def op(*args, **kwargs):
            if calls["n"] == crash_at:
                calls["n"] += 1
                raise OSError("simulated crash")
            calls["n"] += 1
            return real(*args, **kwargs)

        return op

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing(os.replace))
        if crash_at < 4:
            with pytest.raises(OSError, match="simulated crash"):
                save(tmp_path, step=3, parts=parts)
        else:
            save(tmp_path, step=3, parts=parts)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    ckpt, _ = load_latest_valid(tmp_path)
    assert ckpt.state()["step"] in (2, 3)
    if crash_at >= 4:
        assert ckpt.state()["step"] == 3


# --------------------------------------------------------------------------- load_weights


def test_load_weights_from_checkpoint_paths(tmp_path):
    model, optimizer = setup()
    save(tmp_path, parts=(model, optimizer))
    for path in (tmp_path / "last.safetensors", tmp_path / "last.json", tmp_path / "last"):
        assert_same(load_weights(path), model.state_dict())


def test_load_weights_from_plain_files(tmp_path):
    model = make_model()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "plain.safetensors")
    assert_same(load_weights(tmp_path / "plain.safetensors"), model.state_dict())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert_same(load_weights(tmp_path / "weights.pt"), model.state_dict())
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    assert_same(load_weights(tmp_path / "wrapped.pth"), model.state_dict())


def test_load_weights_refuses_pickled_objects(tmp_path):
    torch.save({"weights": Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt") as info:
        load_weights(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)


def test_load_weights_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_weights(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 32)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_weights(tmp_path / "junk.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        load_weights(tmp_path / "list.pt")


def test_an_array_in_the_state_is_refused_by_name(tmp_path):
    """Only tensors, plain values, tuples, lists and dicts are stored: nothing in fosctrain
    keeps NumPy arrays (every random draw comes from torch generators)."""
    model, optimizer = setup()
    with pytest.raises(TypeError, match="ndarray at 'state/weights'"):
        save_checkpoint(tmp_path, "last", model=model, state={"weights": np.zeros(3)})


class _Evil:
    """Unpickling this creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.usefixtures("restore_torch_globals")
def test_malicious_pickle_is_refused_and_never_runs(finished, tmp_path, capsys):
    marker = tmp_path / "pwned"
    zipped = finished / "evil.pt"  # torch.save's zip format
    torch.save({"0.weight": torch.zeros(1), "x": _Evil(marker)}, zipped)
    legacy = finished / "legacy.pth"  # a bare pickle stream
    legacy.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    assert not marker.exists()
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match=path.name) as info:
            load_weights(path)
        assert "\n" not in str(info.value)
        assert not marker.exists()
    rc, _, err = run_cli(capsys, ["eval", zipped, "--n", "8", "--no-progress", "--no-checks"])
    assert_one_line_error(rc, err, "evil.pt")
    rc, _, err = run_cli(capsys, ["attack", legacy, "--n", "8", "--steps", "1"])
    assert_one_line_error(rc, err, "legacy.pth")
    assert not marker.exists()
