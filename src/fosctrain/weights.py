"""Model weights from a user-given file: a fosctrain checkpoint, a plain safetensors state dict,
or a `.pt`/`.pth` state dict read with `torch.load(weights_only=True)`, never unpickling
arbitrary objects; and those weights loaded into a model, strictly."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fosctrain.checkpoint import (
    FORMAT,
    JSON_SUFFIX,
    MODEL_PREFIX,
    TENSOR_SUFFIX,
    CheckpointError,
    load_checkpoint,
    one_line,
    parse_header,
    parse_tensors,
)


def load_weights(path: str | os.PathLike, *, allow_pickle: bool = True) -> dict[str, Tensor]:
    """Model weights from a user-given file, never unpickling arbitrary objects.

    Accepts a checkpoint (its .safetensors, its .json or its stem), a plain safetensors state
    dict, or a .pt/.pth state dict readable by `torch.load(weights_only=True)`; the latter only
    with `allow_pickle`, since even restricted unpickling is a larger surface than safetensors.
    """
    p = Path(path)
    if p.suffix == JSON_SUFFIX:
        return load_checkpoint(p.parent, p.stem).model_state()
    if not p.exists() and Path(str(p) + TENSOR_SUFFIX).is_file():
        return load_checkpoint(p.parent, p.name).model_state()
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist")
    if p.suffix == TENSOR_SUFFIX:
        return _load_safetensors_weights(p)
    if not allow_pickle:
        raise CheckpointError(
            f"{p} is not a .safetensors file and reading it means unpickling, which can run "
            "code; convert it to safetensors (safetensors.torch.save_file) or pass --allow-pickle"
        )
    return _load_torch_weights(p)


def fit_weights(
    model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike, name: str
) -> None:
    """Load `state` into `model` with strict=True, or CheckpointError naming the file, the model
    and the first problem (a missing or unexpected key, a shape mismatch)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        first = _first_problem(problems[0]) if problems else one_line(exc)
        raise CheckpointError(f"{path}: weights do not fit model {name!r} ({first})") from None


def _first_problem(message: str) -> str:
    """torch's 'Missing key(s) in state_dict: "a", "b". ' as 'missing key a (and 1 more)';
    any other message (e.g. 'size mismatch for ...') on one line."""
    match = re.match(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", message)
    keys = re.findall(r'"([^"]*)"', match.group(2)) if match else []
    if not keys:
        return one_line(message).rstrip(".")
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{match.group(1).lower()} key {keys[0]}{more}"


def _load_safetensors_weights(path: Path) -> dict[str, Tensor]:
    """A checkpoint's tensor file (verified against its JSON when present) or a plain one."""
    if path.with_suffix(JSON_SUFFIX).is_file():
        return load_checkpoint(path.parent, path.stem).model_state()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {one_line(exc)}") from None
    header = parse_header(path, data)
    tensors = parse_tensors(path, data)
    metadata = header.get("__metadata__") or {}
    ours = metadata.get("format") == FORMAT or (
        tensors and all(k.startswith((MODEL_PREFIX, "optim/", "state/")) for k in tensors)
    )
    if not ours:
        return tensors
    n = len(MODEL_PREFIX)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}


def _load_torch_weights(path: Path) -> dict[str, Tensor]:
    """A torch.save'd state dict, loaded with weights_only=True (no arbitrary unpickling)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and will not be unpickled; "
            "save the model's state_dict() instead (or use a .safetensors file)"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... on damaged files
        raise CheckpointError(
            f"{path} is not a readable torch weights file ({one_line(exc)})"
        ) from None
    return _as_state_dict(path, obj)


def _as_state_dict(path: Path, obj: Any) -> dict[str, Tensor]:
    """Accept a flat {name: tensor} dict, or one nested under a usual key like 'state_dict'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict: entry {bad[0]!r} is not a tensor")
    return dict(obj)
