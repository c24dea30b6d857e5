"""Models trained elsewhere: a factory `package.module:function` that builds the nn.Module, and a
weights file loaded into it strictly (safetensors; a torch pickle only when asked for)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fosctrain.checkpoint import TENSOR_SUFFIX, file_sha256, one_line
from fosctrain.errors import UserError
from fosctrain.rundir import LoadedModel
from fosctrain.weights import fit_weights, load_weights

META_KEYS = ("factory", "weights", "weights_sha256")  # where an external model's numbers come from


def load_external_model(
    factory: str,
    weights: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """A model trained elsewhere, in eval mode on `device`.

    `factory` is "package.module:function" (the current directory is importable, as under
    `python -m`); the function is called with no arguments and must return an nn.Module.
    `weights` is a safetensors state dict or a fosctrain checkpoint, loaded with strict=True; a
    .pt/.pth state dict only with `allow_pickle` (and then with torch.load(weights_only=True)).
    The config holds "model" (the factory string) and META_KEYS, no dataset, eps or norm.
    Raises UserError, one line, for every bad factory or weights file.
    """
    model = build_external(factory)
    path = Path(weights)
    fit_weights(model, load_weights(path, allow_pickle=allow_pickle), path, factory)
    source = path if path.is_file() else Path(f"{path}{TENSOR_SUFFIX}")  # a checkpoint's stem
    config = {
        "model": factory,
        "factory": factory,
        "weights": str(source),
        "weights_sha256": file_sha256(source),
    }
    return LoadedModel(model.to(device).eval(), config, source)


def build_external(factory: str) -> nn.Module:
    """The untrained nn.Module that `factory` ("package.module:function") returns."""
    module_name, attr = parse_factory(factory)
    with _cwd_importable():
        fn = _attribute(_import(module_name, factory), attr, factory)
        if not callable(fn):
            raise UserError(
                f"factory {factory!r}: {attr} (of type {type(fn).__name__}) is not callable"
            )
        try:
            model = fn()
        except Exception as exc:  # the user's code: any failure is theirs to fix
            raise UserError(
                f"factory {factory!r}: {attr}() raised {type(exc).__name__}: {one_line(exc)}"
            ) from None
    if not isinstance(model, nn.Module):
        raise UserError(
            f"factory {factory!r}: {attr}() returned a value of type {type(model).__name__}, "
            "not a torch nn.Module"
        )
    return model


def parse_factory(factory: str) -> tuple[str, str]:
    """("package.module", "function") from "package.module:function"."""
    module_name, sep, attr = factory.partition(":")
    if not (sep and _dotted_name(module_name) and _dotted_name(attr)):
        raise UserError(
            f"factory {factory!r}: expected MODULE:FUNCTION, e.g. mymodels:make_net "
            "(a module importable from the current directory or the Python path)"
        )
    return module_name, attr


def _dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on sys.path for the duration, as `python -m` would have it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written moments ago is seen
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _import(module_name: str, factory: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise UserError(
                f"factory {factory!r}: no module named {exc.name!r} in the current directory "
                "or on the Python path"
            ) from None
        raise UserError(f"factory {factory!r}: importing {module_name} failed ({exc})") from None
    except Exception as exc:  # the user's module: a syntax error, a failing import-time statement
        raise UserError(
            f"factory {factory!r}: importing {module_name} failed "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from None


def _attribute(module: ModuleType, attr: str, factory: str) -> object:
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(
                f"factory {factory!r}: module {module.__name__} has no attribute {attr!r}"
            ) from None
    return obj
