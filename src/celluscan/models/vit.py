"""Our Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Data flow for one batch (B images, C=3 channels, H=W=image_size, patch size P, width D,
N = (H/P) * (W/P) patches, T = N + 1 tokens including [CLS])::

    x (B, 3, H, W)
      -> patch_embed            (B, D, H/P, W/P)   Conv2d, kernel = stride = P (or a conv stem)
      -> flatten + transpose    (B, N, D)          one token per patch
      -> prepend [CLS]          (B, T, D)
      -> + pos_embed            (B, T, D)          learnable, 1-D; resized if the grid differs
      -> blocks x depth         (B, T, D)          pre-norm attention + MLP, residuals
      -> norm                   (B, T, D)          final LayerNorm
      -> [:, 0]                 (B, D)             the [CLS] features  (``forward_features``)
      -> head                   (B, num_classes)   logits              (``forward``)

Attention has two interchangeable paths chosen by ``fused_attn``:

* explicit: ``softmax(Q K^T / sqrt(d)) V`` with the softmax as its own submodule, so a
  forward hook can record the attention maps (``attention_maps``);
* fused: ``torch.nn.functional.scaled_dot_product_attention``.

They agree to ~1e-6 in fp32. Which is faster depends on dtype and device: on CPU in bf16
autocast the explicit path was measured ~3x faster than SDPA for ViT-B shapes, so use
``choose_fused_attn(dtype, device)`` / ``model.set_fused_attn(flag)`` to pick per run.
(``torch.compile`` was 10x slower with bf16 autocast on CPU; we do not use it.)

The parameter layout maps 1:1 to torchvision's ``VisionTransformer`` (see ``convert.py``):
the Q, K, V projections are one ``Linear(D, 3D)`` exactly like ``in_proj_weight``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "Attention",
    "MLP",
    "EncoderBlock",
    "PatchEmbed",
    "ConvStemEmbed",
    "resize_pos_embed",
    "choose_fused_attn",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to build a model; stored verbatim in a model directory's config.json.

    ``name`` is the registry name the config came from (overrides may have changed fields).
    ``implementation`` is ``"celluscan"`` (our ``VisionTransformer``) or ``"torchvision"``
    (the stock ``torchvision.models.vit_b_16`` wrapped by ``TorchvisionViT``).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 14
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    conv_stem: bool = False
    fused_attn: bool = True
    layer_norm_eps: float = 1e-6
    implementation: str = "celluscan"
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        for f in ("embed_dim", "depth", "num_heads", "mlp_dim", "image_size", "patch_size",
                  "in_channels", "num_classes"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{f} must be a positive integer, got {value!r}")
        if not problems and self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not problems and self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for f in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= float(getattr(self, f)) < 1.0:
                problems.append(f"{f} must be in [0, 1), got {getattr(self, f)!r}")
        if self.conv_stem and (self.patch_size & (self.patch_size - 1)) != 0:
            problems.append(f"conv_stem needs a power-of-two patch_size, got {self.patch_size}")
        if self.implementation not in ("celluscan", "torchvision"):
            problems.append(f"implementation must be 'celluscan' or 'torchvision', got {self.implementation!r}")
        if problems:
            raise ValueError(f"invalid ViTConfig {self.name!r}: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def with_overrides(self, **overrides: Any) -> "ViTConfig":
        """A copy with some fields changed; unknown field names raise a clear error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown ViTConfig field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}")
        return cls(**data)


def choose_fused_attn(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Which attention path is faster for this compute dtype and device.

    On CPU with bf16/fp16 (autocast) SDPA was measured ~3x slower than the explicit path, so
    the explicit path is chosen there; everywhere else the fused kernel is used.
    """
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Patchify: Conv2d with kernel = stride = P.  (B, C, H, W) -> (B, D, H/P, W/P)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvStemEmbed(nn.Module):
    """Convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better").

    log2(P) blocks of [3x3 conv stride 2 -> BatchNorm -> ReLU] reach the same total stride P
    as patchify, then a 1x1 conv maps to the embedding width. Channels double each block and
    end at D/2 (the paper's ViT-S/16 stem: 24, 48, 96, 192 -> 384).
    (B, C, H, W) -> (B, D, H/P, W/P)
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        num_convs = int(math.log2(patch_size))
        layers: list[nn.Module] = []
        channels_in = in_channels
        for i in range(num_convs):
            channels_out = max(8, embed_dim // 2 ** (num_convs - i))
            layers += [
                nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels_out),
                nn.ReLU(inplace=True),
            ]
            channels_in = channels_out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels_in, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x))


class Attention(nn.Module):
    """Multi-head self-attention.  (B, T, D) -> (B, T, D).

    ``qkv`` is one Linear(D, 3D) whose weight rows are [W_q; W_k; W_v], the same layout as
    torchvision's ``in_proj_weight``. Each of Q, K, V is split into ``num_heads`` heads of
    width d = D / num_heads.
    """

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0,
                 dropout: float = 0.0, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)  # own submodule: hook it to record attention maps
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, 3D) -> (B, T, 3, heads, d) -> (3, B, heads, T, d)
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, d)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
            weights = self.softmax(scores)  # rows sum to 1
            out = self.attn_drop(weights) @ v  # (B, heads, T, d)
        out = out.transpose(1, 2).reshape(B, T, D)  # heads back side by side
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    """Linear(D, M) -> GELU -> Dropout -> Linear(M, D) -> Dropout.  (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a whole sample with
    probability ``p`` and scale the kept ones by 1/(1-p); the identity at evaluation."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class EncoderBlock(nn.Module):
    """Pre-norm transformer block.  (B, T, D) -> (B, T, D).

    x = x + DropPath(Attention(LayerNorm(x)));  x = x + DropPath(MLP(LayerNorm(x)))
    """

    def __init__(self, config: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, config.num_heads, config.attention_dropout, config.dropout,
                              config.fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MLP(dim, config.mlp_dim, config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize learnable position embeddings to another patch grid.

    pos_embed: (1, prefix + g*g, D) for a square g x g grid. The prefix ([CLS]) rows are kept
    as they are; the grid rows are reshaped to (1, D, g, g), resized bicubically to
    (1, D, gh, gw), and flattened back. Returns (1, prefix + gh*gw, D), same dtype.
    Differentiable, so it is usable inside ``forward``.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = grid.shape[1], grid.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"cannot resize position embeddings: {n} grid tokens is not a square grid")
    gh, gw = new_grid
    if (old, old) == (gh, gw):
        return pos_embed
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT classifier.  ``forward``: (B, 3, H, W) -> logits (B, num_classes).

    H and W must be multiples of the patch size; when they differ from ``config.image_size``
    the position embeddings are resized on the fly (bicubic over the 2-D grid, [CLS] kept).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.implementation != "celluscan":
            raise ValueError(f"config {config.name!r} is for the {config.implementation} model")
        self.config = config
        dim = config.embed_dim
        embed_cls = ConvStemEmbed if config.conv_stem else PatchEmbed
        self.patch_embed = embed_cls(config.in_channels, dim, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(config.dropout)
        # stochastic depth grows linearly with depth, from 0 at the first block to drop_path
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(EncoderBlock(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        self.reset_parameters()

    # ---- initialisation ---------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) for tokens, position embeddings and Linear weights; zero
        biases; LeCun-normal patchify conv (as torchvision). The head is *not* zero-initialised,
        so every parameter receives a non-zero gradient from the first step."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---- attention path ---------------------------------------------------------------------

    @property
    def fused_attn(self) -> bool:
        """True when every block uses SDPA."""
        return all(block.attn.fused_attn for block in self.blocks)

    def set_fused_attn(self, fused: bool) -> "VisionTransformer":
        """Switch every block between SDPA (True) and the explicit softmax path (False)."""
        for block in self.blocks:
            block.attn.fused_attn = bool(fused)
        return self

    def set_attention_path_for(self, dtype: torch.dtype,
                               device: torch.device | str = "cpu") -> "VisionTransformer":
        """Pick the faster attention path for a compute dtype/device (see ``choose_fused_attn``)."""
        return self.set_fused_attn(choose_fused_attn(dtype, device))

    # ---- forward ----------------------------------------------------------------------------

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh*gw, D): the stored embeddings, resized when the grid differs."""
        if grid == (self.config.grid_size, self.config.grid_size):
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> every token after the final LayerNorm, (B, 1 + N, D); token 0 is [CLS]."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        P = self.config.patch_size
        if x.shape[-2] % P or x.shape[-1] % P:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {P}")
        x = self.patch_embed(x)  # (B, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        x = self.pos_drop(x + self._pos_embed_for(grid))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> final-normed [CLS] features (B, D)."""
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's attention weights for a batch: ``depth`` tensors of (B, heads, T, T).

        Temporarily switches to the explicit path, records the softmax outputs with forward
        hooks (installed only for this call), then removes the hooks and restores each
        block's flag. Rows sum to 1 (weights before attention dropout). Runs under the
        caller's grad mode; wrap in ``torch.no_grad()`` when gradients are not needed.
        """
        maps: list[torch.Tensor] = []
        previous = [block.attn.fused_attn for block in self.blocks]
        handles = [block.attn.softmax.register_forward_hook(lambda _m, _i, out: maps.append(out))
                   for block in self.blocks]
        try:
            self.set_fused_attn(False)
            self.forward_tokens(x)
        finally:
            for handle in handles:
                handle.remove()
            for block, flag in zip(self.blocks, previous):
                block.attn.fused_attn = flag
        return maps

    # ---- weights in our canonical layout (polymorphic with TorchvisionViT) -------------------

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in our layout (the format stored in model directories)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_canonical_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        return self.load_state_dict(state_dict, strict=strict)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Load-time position-embedding interpolation: a checkpoint trained at another image
        # size loads into this one (bicubic over the 2-D grid, [CLS] kept).
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            g = self.config.grid_size
            log.info("resizing position embeddings %s -> %s", tuple(state_dict[key].shape),
                     tuple(self.pos_embed.shape))
            state_dict[key] = resize_pos_embed(state_dict[key], (g, g))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
