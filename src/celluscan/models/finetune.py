"""Fine-tuning modes: choose which parameters train.

* ``linear_probe``   backbone frozen; only the classification head trains.
* ``full``           everything trains.
* ``last_n_blocks``  the last N encoder blocks + the final LayerNorm + the head train.

Works for our ``VisionTransformer`` and the torchvision wrapper alike (both expose
``head``, ``blocks`` and ``norm``). Note: frozen BatchNorm layers (conv stem) still update
their running statistics in ``train()`` mode; freezing only stops gradient updates.
"""

from __future__ import annotations

from torch import nn

__all__ = ["FINETUNE_MODES", "apply_finetune_mode", "count_trainable"]

FINETUNE_MODES = ("linear_probe", "full", "last_n_blocks")


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_finetune_mode(model: nn.Module, mode: str, last_n: int | None = None) -> int:
    """Set ``requires_grad`` for ``mode``; returns the number of trainable parameters."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(FINETUNE_MODES)}")
    blocks = list(model.blocks)
    if mode == "last_n_blocks":
        if last_n is None or not 0 <= last_n <= len(blocks):
            raise ValueError(f"last_n_blocks needs last_n between 0 and {len(blocks)}, got {last_n!r}")
    elif last_n is not None:
        raise ValueError(f"last_n is only used with mode 'last_n_blocks', not {mode!r}")

    model.requires_grad_(mode == "full")
    if mode == "full":
        return count_trainable(model)
    trainable: list[nn.Module] = [model.head]
    if mode == "last_n_blocks":
        trainable += [model.norm] + (blocks[len(blocks) - last_n:] if last_n else [])
    for module in trainable:
        module.requires_grad_(True)
    return count_trainable(model)
