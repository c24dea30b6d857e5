"""Devices: the one picker of training and of the verbs that load a trained model, and where
a model lives."""

from __future__ import annotations

import torch

from fosctrain.errors import UserError


def select_device(name: str | None = "auto") -> torch.device:
    """The named torch device; "auto" (or None) is cuda when available, else cpu. UserError
    for a name torch does not know or a CUDA device on a machine without CUDA."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (cpu for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def describe(device: torch.device) -> str:
    """The device a run trained on, as its summary.json records it: "cpu", or the CUDA
    device with its name ("cuda:0 NVIDIA H200")."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def trained_on(summary: dict) -> str:
    """The device a run's summary.json records ("cpu" for runs from before it was recorded:
    they all trained on a CPU)."""
    return str(summary.get("device", "cpu"))


def on_cpu(summary: dict) -> bool:
    """Whether a run trained on a CPU: only such runs' training seconds belong on a
    CPU-seconds axis."""
    return trained_on(summary) == "cpu"
