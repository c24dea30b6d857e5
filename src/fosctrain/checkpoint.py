"""Checkpoints as a safetensors file (all tensors) plus a JSON file (everything else).

Nothing here ever unpickles: tensors go through safetensors, the rest through JSON (user weight
files, `.pt` included, are fosctrain.weights' concern). Each JSON records the sha256
and size of its tensor file, so a pair from two different saves (a crash between the two
writes) or a damaged file is detected on load. Saving rotates the previous pair to NAME-prev
in an order that leaves at least one complete, valid pair on disk at every instant.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from fosctrain import __version__
from fosctrain.errors import UserError
from fosctrain.files import atomic_write_bytes, atomic_write_json, fsync_dir

FORMAT = "fosctrain-checkpoint"
FORMAT_VERSION = 1
TENSOR_SUFFIX = ".safetensors"
JSON_SUFFIX = ".json"
PREV_SUFFIX = "-prev"

MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim"
OPTIM_GROUPS_PREFIX = "optim/groups"
STATE_PREFIX = "state"

_TAGS = ("__tensor__", "__tuple__", "__dict__")
_CHUNK = 1 << 20


class CheckpointError(UserError):
    """A missing, damaged or unusable checkpoint or weights file; one line naming the file."""


class ConfigMismatchError(CheckpointError):
    """A valid checkpoint written for another configuration: not damage, so never fall back."""


# --------------------------------------------------------------------------- small helpers


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """The (tensor file, JSON file) paths of checkpoint `name` in `directory`."""
    _check_name(name)
    base = Path(directory)
    return base / f"{name}{TENSOR_SUFFIX}", base / f"{name}{JSON_SUFFIX}"


def _check_name(name: str) -> None:
    """Reject names that would escape the directory or be empty."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"invalid checkpoint name {name!r}: use a plain file stem")


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (torch's messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------- JSON encoding


def _encode(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Turn `obj` into JSON-able data, moving tensors into `tensors` under keys below `prefix`.

    Tuples and dicts with non-string keys are tagged so that `_decode`
    gives back the same types (optimizers and RNG setters care about them). Callables inside
    dicts (LR lambdas) are dropped; other unknown objects are a programming error.
    """
    if isinstance(obj, Tensor):
        key = prefix
        if key in tensors:
            raise ValueError(f"two checkpoint tensors would share the key {key!r}")
        tensors[key] = obj.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": _encode_seq(obj, prefix, tensors)}
    if isinstance(obj, list):
        return _encode_seq(obj, prefix, tensors)
    if isinstance(obj, dict):
        return _encode_dict(obj, prefix, tensors)
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def _encode_seq(items: Iterable[Any], prefix: str, tensors: dict[str, Tensor]) -> list:
    return [_encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(items)]


def _encode_pairs(items: Iterable[tuple[Any, Any]], prefix: str, tensors: dict) -> list:
    return [
        [_encode(k, f"{prefix}/key{i}", tensors), _encode(v, f"{prefix}/{k}", tensors)]
        for i, (k, v) in enumerate(items)
    ]


def _encode_dict(obj: dict, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Plain dicts stay plain; non-string keys (or a key that looks like a tag) get tagged."""
    kept = {k: v for k, v in obj.items() if not callable(v) or isinstance(v, Tensor)}
    if all(isinstance(k, str) for k in kept) and not (len(kept) == 1 and set(kept) <= set(_TAGS)):
        return {k: _encode(v, f"{prefix}/{k}", tensors) for k, v in kept.items()}
    return {"__dict__": _encode_pairs(kept.items(), prefix, tensors)}


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of `_encode`: rebuild tuples and non-string-keyed dicts and put the tensors back."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        decoder = _TAG_DECODERS.get(tag)
        if decoder is not None:
            return decoder(value, tensors)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _decode_pairs(value: list, tensors: dict[str, Tensor]) -> list[tuple[Any, Any]]:
    return [(_decode(k, tensors), _decode(v, tensors)) for k, v in value]


_TAG_DECODERS: dict[str, Callable[[Any, dict[str, Tensor]], Any]] = {
    "__tensor__": lambda key, tensors: tensors[key],
    "__tuple__": lambda value, tensors: tuple(_decode(v, tensors) for v in value),
    "__dict__": lambda value, tensors: dict(_decode_pairs(value, tensors)),
}


# --------------------------------------------------------------------------- the Checkpoint


@dataclass
class Checkpoint:
    """A verified checkpoint: its tensors, its JSON (`meta`) and the tensor file's path."""

    tensors: dict[str, Tensor]
    meta: dict
    path: Path

    @property
    def json_path(self) -> Path:
        return self.path.with_suffix(JSON_SUFFIX)

    @property
    def config_hash(self) -> str:
        return self.meta.get("config_hash", "")

    def model_state(self) -> dict[str, Tensor]:
        """The model's state dict (keys without the "model/" prefix)."""
        n = len(MODEL_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(MODEL_PREFIX)}

    def optimizer_state(self) -> dict | None:
        """The optimizer's state dict as `optimizer.state_dict()` gave it, or None if not saved."""
        return self._decoded("optimizer")

    def state(self) -> dict:
        """The `state` dict given to save_checkpoint (epoch, metrics, RNG states...), rebuilt."""
        return self._decoded("state") or {}

    def _decoded(self, field: str) -> Any:
        raw = self.meta.get(field)
        return None if raw is None else _decode(raw, self.tensors)


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    directory: str | os.PathLike,
    name: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
    config_hash: str = "",
    keep_previous: bool = True,
) -> Path:
    """Write checkpoint `name` into `directory` (NAME.safetensors + NAME.json); returns the
    tensor file's path. With keep_previous, the current valid pair is kept as NAME-prev first."""
    tensor_path, json_path = checkpoint_paths(directory, name)
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        tensors[MODEL_PREFIX + key] = (
            value.detach().cpu().clone(memory_format=torch.contiguous_format)
        )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "fosctrain_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash,
        "state": _encode(dict(state or {}), STATE_PREFIX, tensors),
        "optimizer": _encode_optimizer(optimizer, tensors),
    }
    data = safetensors.torch.save(tensors, metadata=_header_metadata(meta))
    meta.update(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), tensor_keys=sorted(tensors)
    )
    if keep_previous:
        _rotate_to_previous(Path(directory), name)
    atomic_write_bytes(tensor_path, data)
    atomic_write_json(json_path, meta)
    return tensor_path


def _encode_optimizer(optimizer: torch.optim.Optimizer | None, tensors: dict) -> dict | None:
    """Optimizer state: per-parameter tensors under optim/<index>/<key>, the rest in JSON."""
    if optimizer is None:
        return None
    sd = optimizer.state_dict()
    return {
        "state": _encode(sd["state"], OPTIM_PREFIX, tensors),
        "param_groups": _encode(sd["param_groups"], OPTIM_GROUPS_PREFIX, tensors),
    }


def _header_metadata(meta: dict) -> dict[str, str]:
    """The fields copied into the safetensors header so the two files can be cross-checked."""
    keys = ("format", "format_version", "name", "fosctrain_version", "created", "config_hash")
    return {k: str(meta[k]) for k in keys}


def _rotate_to_previous(directory: Path, name: str) -> None:
    """Make NAME-prev a copy of the current NAME pair, if that pair is intact.

    Order: tensor file first, JSON second, each via hard link (or copy) + atomic rename. Until
    the JSON lands NAME-prev is invalid but NAME is still intact; afterwards both are. If NAME
    is damaged (e.g. a crash mid-save), NAME-prev may be the only good pair, so it is kept.
    """
    cur_t, cur_j = checkpoint_paths(directory, name)
    prev_t, prev_j = checkpoint_paths(directory, name + PREV_SUFFIX)
    if not _pair_intact(cur_t, cur_j):
        return
    _link_or_copy(cur_t, prev_t)
    _link_or_copy(cur_j, prev_j)


def _pair_intact(tensor_path: Path, json_path: Path) -> bool:
    """Cheap check that a pair belongs together: the JSON's recorded size and sha256 match."""
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        return (
            isinstance(meta, dict)
            and tensor_path.stat().st_size == meta.get("size")
            and file_sha256(tensor_path) == meta.get("sha256")
        )
    except (OSError, ValueError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make `dst` hold `src`'s content: a hard link renamed over `dst`, or a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    directory: str | os.PathLike, name: str, *, expected_config_hash: str | None = None
) -> Checkpoint:
    """Load and fully verify checkpoint `name`; any problem raises CheckpointError (one line)."""
    tensor_path, json_path = checkpoint_paths(directory, name)
    _check_exists(tensor_path, json_path)
    meta = _read_meta(json_path)
    data = _read_tensor_bytes(tensor_path, json_path, meta)
    header = parse_header(tensor_path, data)
    tensors = parse_tensors(tensor_path, data)
    _cross_check(tensor_path, json_path, meta, header, tensors)
    if expected_config_hash is not None and meta["config_hash"] != expected_config_hash:
        raise ConfigMismatchError(
            f"checkpoint {tensor_path} was written for a different configuration "
            f"(hash {meta['config_hash'] or '<none>'} != {expected_config_hash})"
        )
    return Checkpoint(tensors=tensors, meta=meta, path=tensor_path)


def _check_exists(tensor_path: Path, json_path: Path) -> None:
    has_t, has_j = tensor_path.is_file(), json_path.is_file()
    if not has_t and not has_j:
        raise CheckpointError(
            f"no checkpoint at {tensor_path} (neither it nor {json_path.name} exists)"
        )
    if not has_j:
        raise CheckpointError(f"checkpoint {tensor_path} has no JSON file: {json_path} is missing")
    if not has_t:
        raise CheckpointError(
            f"checkpoint {json_path} has no tensor file: {tensor_path} is missing"
        )


def _read_meta(json_path: Path) -> dict:
    """Parse the JSON and check it is one of ours, with the fields the loader relies on."""
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{json_path} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{json_path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {json_path}: {one_line(exc)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a fosctrain checkpoint JSON")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path} has checkpoint format version {version!r}; this "
            f"fosctrain reads up to {FORMAT_VERSION}"
        )
    for field, kind in (
        ("sha256", str),
        ("size", int),
        ("tensor_keys", list),
        ("config_hash", str),
    ):
        if not isinstance(meta.get(field), kind):
            raise CheckpointError(f"{json_path} lacks a valid {field!r} field")
    return meta


def _read_tensor_bytes(tensor_path: Path, json_path: Path, meta: dict) -> bytes:
    """Read the tensor file and check its size and sha256 against the JSON."""
    try:
        data = tensor_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {tensor_path}: {one_line(exc)}") from None
    expected = meta["size"]
    if len(data) < expected:
        raise CheckpointError(
            f"{tensor_path} is truncated ({len(data)} bytes, {json_path.name} records {expected})"
        )
    if len(data) > expected:
        raise CheckpointError(
            f"{tensor_path} has {len(data)} bytes but {json_path.name} records "
            f"{expected}: the pair is from different saves"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"{tensor_path}: checksum mismatch (sha256 {digest[:12]}… != "
            f"{meta['sha256'][:12]}… recorded in {json_path.name}): the file "
            "is damaged or the pair is from different saves"
        )
    return data


def parse_header(path: Path, data: bytes) -> dict:
    """The safetensors JSON header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is not a safetensors file (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CheckpointError(
            f"{path} is not a safetensors file (or is truncated): header "
            f"length {n} exceeds the file"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not an object)")
    return header


def parse_tensors(path: Path, data: bytes) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(f"{path} is not a valid safetensors file ({one_line(exc)})") from None


def _cross_check(
    tensor_path: Path, json_path: Path, meta: dict, header: dict, tensors: dict[str, Tensor]
) -> None:
    """The tensor keys and the header metadata must agree with the JSON."""
    if sorted(tensors) != sorted(meta["tensor_keys"]):
        missing = sorted(set(meta["tensor_keys"]) - set(tensors))
        extra = sorted(set(tensors) - set(meta["tensor_keys"]))
        raise CheckpointError(
            f"{tensor_path}: tensor keys differ from {json_path.name} "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    metadata = header.get("__metadata__") or {}
    for key, value in _header_metadata(meta).items():
        if metadata.get(key) != value:
            raise CheckpointError(
                f"{tensor_path}: header field {key!r} is "
                f"{metadata.get(key)!r} but {json_path.name} says {value!r}"
            )


def load_latest_valid(
    directory: str | os.PathLike, name: str = "last", *, expected_config_hash: str | None = None
) -> tuple[Checkpoint, list[str]]:
    """The first valid checkpoint of NAME, NAME-prev, plus warnings about damaged ones skipped.

    A configuration mismatch is not damage: it raises at once instead of falling back.
    """
    warnings: list[str] = []
    for candidate in (name, name + PREV_SUFFIX):
        try:
            ckpt = load_checkpoint(directory, candidate, expected_config_hash=expected_config_hash)
        except ConfigMismatchError:
            raise
        except CheckpointError as exc:
            warnings.append(f"skipped checkpoint {candidate!r}: {exc}")
            continue
        return ckpt, warnings
    raise CheckpointError(f"no valid checkpoint {name!r} in {directory}: " + "; ".join(warnings))


# --------------------------------------------------------------------------- restoring


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load the model (strict), then the optimizer state, from `checkpoint`."""
    where = checkpoint.path
    try:
        model.load_state_dict(checkpoint.model_state(), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{where} does not fit the model: {one_line(exc)}") from None
    if optimizer is not None:
        state = checkpoint.optimizer_state()
        if state is None:
            raise CheckpointError(f"{where} holds no optimizer state")
        try:
            optimizer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{where} does not fit the optimizer: {one_line(exc)}") from None
