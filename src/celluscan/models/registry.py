"""Named model configurations (timm-style registry) and ``create_model``.

>>> from celluscan.models import create_model, list_models
>>> "vit_b_16" in list_models()
True
>>> model = create_model("vit_test", num_classes=14)      # tiny, for tests
>>> model = create_model("vit_s_16", image_size=384, conv_stem=True)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from celluscan.models.vit import ViTConfig, VisionTransformer

__all__ = ["MODEL_CONFIGS", "register_config", "get_config", "build_model", "create_model", "list_models"]

MODEL_CONFIGS: dict[str, ViTConfig] = {}


def register_config(config: ViTConfig) -> ViTConfig:
    if config.name in MODEL_CONFIGS:
        raise ValueError(f"model {config.name!r} is already registered")
    MODEL_CONFIGS[config.name] = config
    return config


register_config(ViTConfig(
    name="vit_b_16", embed_dim=768, depth=12, num_heads=12, mlp_dim=3072,
    description="ViT-Base/16 (Dosovitskiy et al. 2021); torchvision-compatible weights"))
register_config(ViTConfig(
    name="vit_s_16", embed_dim=384, depth=12, num_heads=6, mlp_dim=1536,
    description="ViT-Small/16 (DeiT-S shape)"))
register_config(ViTConfig(
    name="vit_ti_16", embed_dim=192, depth=12, num_heads=3, mlp_dim=768,
    description="ViT-Tiny/16 (DeiT-Ti shape); fast on CPU"))
register_config(ViTConfig(
    name="vit_test", embed_dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, patch_size=8,
    description="tiny model for tests (32 px, 16 patches)"))
register_config(ViTConfig(
    name="torchvision_vit_b_16", embed_dim=768, depth=12, num_heads=12, mlp_dim=3072,
    implementation="torchvision",
    description="stock torchvision.models.vit_b_16 (weights=None), wrapped"))


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(MODEL_CONFIGS)


def get_config(name: str, num_classes: int = 14, **overrides: Any) -> ViTConfig:
    """The registered config ``name`` with ``num_classes`` and any field overrides applied."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODEL_CONFIGS[name].with_overrides(num_classes=num_classes, **overrides)


def build_model(config: ViTConfig) -> nn.Module:
    """Instantiate the implementation a config names (ours or the torchvision wrapper)."""
    if config.implementation == "torchvision":
        from celluscan.models.torchvision_vit import TorchvisionViT

        return TorchvisionViT(config)
    return VisionTransformer(config)


def create_model(name: str, num_classes: int = 14, **overrides: Any) -> nn.Module:
    """Build registered model ``name``. Overrides: image_size, patch_size, dropout,
    attention_dropout, conv_stem, fused_attn (any ``ViTConfig`` field)."""
    return build_model(get_config(name, num_classes=num_classes, **overrides))


def config_overrides(config: ViTConfig) -> dict[str, Any]:
    """The fields where ``config`` differs from its registered base (``num_classes`` included)."""
    base = MODEL_CONFIGS.get(config.name)
    if base is None:
        return {}
    return {k: v for k, v in config.to_dict().items() if getattr(base, k) != v}
