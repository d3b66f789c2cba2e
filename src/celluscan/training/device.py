"""Device, precision and thread choices for training and benchmarking (checked once)."""

from __future__ import annotations

import os

import torch

from celluscan.inference.backends import cpu_supports_bf16

__all__ = ["resolve_device", "autocast_dtype", "set_cpu_threads"]


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available (use device: auto or cpu)")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto|bf16|fp32) on ``device``; None = fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = cpu_supports_bf16()
    else:
        supported = False
    if precision == "bf16" and not supported:
        raise RuntimeError(f"precision bf16 requested but {device} has no bf16 support")
    return torch.bfloat16 if supported else None


def set_cpu_threads(threads: int = 0, processes_per_node: int = 1) -> int:
    """Use ``threads`` (0: all cores shared among this node's processes). Returns the count."""
    n = threads or max(1, (os.cpu_count() or 1) // max(1, processes_per_node))
    torch.set_num_threads(n)
    return n
