"""The stock torchvision ViT-B/16, wrapped to offer the same interface as our ``VisionTransformer``.

Registered as ``torchvision_vit_b_16``. It is built with ``weights=None`` (never downloads);
pretrained weights come from a local file through ``load_pretrained``. Model directories
store weights in *our* layout, converted on save and load (``canonical_state_dict``).
"""

from __future__ import annotations

import torch
from torch import nn

from celluscan.models.convert import from_torchvision_state_dict, to_torchvision_state_dict
from celluscan.models.vit import ViTConfig

__all__ = ["TorchvisionViT"]

# torchvision's vit_b_16 architecture; configs for this wrapper must match it.
_VIT_B_16_SHAPE = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072,
                   "patch_size": 16, "in_channels": 3, "conv_stem": False, "layer_norm_eps": 1e-6}


class TorchvisionViT(nn.Module):
    """``torchvision.models.vit_b_16(weights=None, ...)`` behind our model interface.

    ``forward``: (B, 3, S, S) -> logits (B, num_classes), S = ``config.image_size`` (torchvision
    accepts only that size). ``forward_features``: (B, 768). ``attention_maps``: 12 x (B, 12, T, T).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        from torchvision.models import vit_b_16

        mismatched = {k: getattr(config, k) for k, v in _VIT_B_16_SHAPE.items() if getattr(config, k) != v}
        if config.implementation != "torchvision" or mismatched:
            raise ValueError(f"the torchvision wrapper builds vit_b_16 only; config {config.name!r} "
                             f"differs in {mismatched or 'implementation'}")
        self.config = config
        self.model = vit_b_16(weights=None, num_classes=config.num_classes, image_size=config.image_size,
                              dropout=config.dropout, attention_dropout=config.attention_dropout)
        self._fused_attn = config.fused_attn

    # Same names as our VisionTransformer, so fine-tuning and tools can treat both alike.
    @property
    def head(self) -> nn.Linear:
        return self.model.heads.head

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    @property
    def norm(self) -> nn.LayerNorm:
        return self.model.encoder.ln

    @property
    def fused_attn(self) -> bool:
        return self._fused_attn

    def set_fused_attn(self, fused: bool) -> "TorchvisionViT":
        """Recorded for interface parity; torchvision's MultiheadAttention picks its own kernel."""
        self._fused_attn = bool(fused)
        return self

    def set_attention_path_for(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> "TorchvisionViT":
        return self

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> all final-normed tokens (B, 1 + N, 768)."""
        x = self.model._process_input(x)  # (B, N, D)
        cls = self.model.class_token.expand(x.shape[0], -1, -1)
        return self.model.encoder(torch.cat([cls, x], dim=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.heads(self.forward_features(x))

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's attention weights (B, heads, T, T), via temporary hooks that ask
        ``MultiheadAttention`` for per-head weights (``need_weights=True``)."""
        maps: list[torch.Tensor] = []

        def ask_for_weights(_module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def record(_module, _args, output):
            maps.append(output[1])

        handles = []
        for layer in self.model.encoder.layers:
            handles.append(layer.self_attention.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
            handles.append(layer.self_attention.register_forward_hook(record))
        try:
            self.forward_tokens(x)
        finally:
            for handle in handles:
                handle.remove()
        return maps

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in our layout (the format stored in model directories)."""
        return from_torchvision_state_dict({k: v.detach() for k, v in self.model.state_dict().items()})

    def load_canonical_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        return self.model.load_state_dict(to_torchvision_state_dict(state_dict), strict=strict)
