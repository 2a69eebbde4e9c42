"""Turning a user's --device into a torch.device, with one clear error when it cannot be had."""

from __future__ import annotations

import torch

from genfast.errors import GenfastError


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> torch.device; auto takes the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenfastError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise GenfastError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenfastError(f"device '{name}' asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GenfastError(f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return device
