"""`celluscan models`: list the model registry, or summarise one model layer by layer.

    celluscan models                                   # name, parameters, GFLOPs at 224, ...
    celluscan models --summary vit_s_16 --image-size 224 [--conv-stem] [--depth 3]
"""

from __future__ import annotations

import argparse

HELP = "list the model registry (parameters, GFLOPs) or summarise one model"

FLOPS_NOTE = ("GFLOPs: one {size}x{size} image, 2 FLOPs per multiply-add (GFLOPs = 2 x MACs / 1e9), "
              "matmuls and convolutions counted by torch FlopCounterMode.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", metavar="NAME", help="print a layer-by-layer table for model NAME")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size for --summary (default: the model's) and for listing GFLOPs (default 224)")
    parser.add_argument("--num-classes", type=int, default=14, help="classifier outputs (default 14)")
    parser.add_argument("--conv-stem", action="store_true", help="--summary: use the convolutional stem")
    parser.add_argument("--depth", type=int, default=3, help="--summary: module nesting depth shown (default 3)")


def _gflops(flops: int) -> str:
    gflops = flops / 1e9
    return f"{gflops:.2f}" if gflops >= 0.1 else f"{gflops:.4f}"


def _list(num_classes: int, image_size: int) -> str:
    from celluscan.models.registry import MODEL_CONFIGS, get_config
    from celluscan.models.summary import count_flops, count_parameters, meta_model

    header = ("model", "params", f"GFLOPs@{image_size}", "image", "patch", "description")
    rows = []
    for name in MODEL_CONFIGS:
        config = get_config(name, num_classes=num_classes)
        params = count_parameters(meta_model(config))
        rows.append((name, f"{params / 1e6:.2f}M", _gflops(count_flops(config, image_size)), str(config.image_size),
                     str(config.patch_size), config.description))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines += ["", f"params include a {num_classes}-class head. " + FLOPS_NOTE.format(size=image_size)]
    return "\n".join(lines)


def _summary(name: str, num_classes: int, image_size: int | None, conv_stem: bool, depth: int) -> str:
    from celluscan.models.registry import get_config
    from celluscan.models.summary import count_flops, count_parameters, format_layer_table, layer_table, meta_model

    overrides = {"conv_stem": True} if conv_stem else {}
    if image_size:
        overrides["image_size"] = image_size
    config = get_config(name, num_classes=num_classes, **overrides)
    model = meta_model(config)
    model.set_fused_attn(False)  # the explicit path, so the softmax rows show (1, heads, T, T)
    size = config.image_size
    table = format_layer_table(layer_table(model, size, max_depth=depth))
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    return "\n".join([
        f"{name}: {config.description}",
        f"input 1x{config.in_channels}x{size}x{size}, {config.num_patches} patches + [CLS], "
        f"width {config.embed_dim}, {config.depth} blocks, {config.num_heads} heads, MLP {config.mlp_dim}"
        + (", conv stem" if config.conv_stem else ""),
        table,
        f"total params: {total:,}   trainable: {trainable:,}   "
        f"GFLOPs: {_gflops(count_flops(config, size))}",
        FLOPS_NOTE.format(size=size),
    ])


def run(args: argparse.Namespace) -> int:
    import sys

    from celluscan.models.registry import list_models

    if args.summary:
        if args.summary not in list_models():
            print(f"celluscan models: unknown model {args.summary!r}; available: {', '.join(list_models())}",
                  file=sys.stderr)
            return 2
        try:
            print(_summary(args.summary, args.num_classes, args.image_size, args.conv_stem, args.depth))
        except ValueError as exc:  # e.g. image size not a multiple of the patch size
            print(f"celluscan models: {exc}", file=sys.stderr)
            return 2
        return 0
    print(_list(args.num_classes, args.image_size or 224))
    return 0
