"""Model size and cost: parameter counts, FLOPs and a torchinfo-like layer table.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one image, which
counts matrix multiplications and convolutions at 2 FLOPs per multiply-add
(GFLOPs = 2 x MACs / 1e9); element-wise ops (softmax, LayerNorm, GELU) are not counted.
Models are built on the ``meta`` device for this, so no memory is allocated and no
arithmetic is done: summarising ViT-B takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from celluscan.models.registry import build_model
from celluscan.models.vit import ViTConfig, VisionTransformer

__all__ = ["count_parameters", "count_flops", "LayerRow", "layer_table", "format_layer_table", "meta_model"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def meta_model(config: ViTConfig) -> nn.Module:
    """Build ``config``'s model on the meta device (shapes only), in eval mode."""
    with torch.device("meta"):
        return build_model(config).eval()


def count_flops(config: ViTConfig, image_size: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of one forward pass for one image of ``image_size``.

    Counted on our implementation with the explicit attention path (so the attention
    matmuls are visible to the counter); the torchvision wrapper has the same arithmetic.
    """
    size = image_size or config.image_size
    config = config.with_overrides(implementation="celluscan", fused_attn=False, image_size=size)
    with torch.device("meta"):
        model = VisionTransformer(config).eval()
        x = torch.empty(1, config.in_channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@dataclass(frozen=True)
class LayerRow:
    name: str  # dotted module path ("" for the model itself)
    kind: str  # class name
    depth: int
    output_shape: tuple[int, ...] | None  # None when the module did not run
    num_params: int  # including submodules
    num_trainable: int


def layer_table(model: nn.Module, image_size: int, max_depth: int = 3) -> list[LayerRow]:
    """One row per module down to ``max_depth``, with the output shape of a (1, C, S, S) forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    modules = [(name, module) for name, module in model.named_modules()
               if (name.count(".") + 1 if name else 0) <= max_depth]
    for name, module in modules:
        def record(_m, _inputs, output, name=name):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor):
                shapes[name] = tuple(tensor.shape)
        handles.append(module.register_forward_hook(record))
    param = next(model.parameters())
    x = torch.zeros(1, model.config.in_channels, image_size, image_size, device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [
        LayerRow(name=name, kind=type(module).__name__, depth=name.count(".") + 1 if name else 0,
                 output_shape=shapes.get(name), num_params=count_parameters(module),
                 num_trainable=count_parameters(module, trainable_only=True))
        for name, module in modules
    ]


def format_layer_table(rows: list[LayerRow]) -> str:
    """Render rows as a fixed-width text table (indentation shows nesting)."""
    header = ("Layer (type)", "Output shape", "Param #", "Trainable")
    body = []
    for row in rows:
        label = row.name.rsplit(".", 1)[-1] if row.name else "(model)"
        shape = "x".join(str(d) for d in row.output_shape) if row.output_shape else "--"
        body.append(("  " * row.depth + f"{label} ({row.kind})", shape, f"{row.num_params:,}", f"{row.num_trainable:,}"))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, body), rule])
