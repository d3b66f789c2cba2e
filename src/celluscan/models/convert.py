"""Map state dicts between torchvision's ``VisionTransformer`` layout and ours.

The two architectures are identical parameter for parameter; only the names differ:

=====================================  =====================================================
ours                                    torchvision
=====================================  =====================================================
patch_embed.proj.{weight,bias}          conv_proj.{weight,bias}
cls_token                               class_token
pos_embed                               encoder.pos_embedding
blocks.{i}.norm1.*                      encoder.layers.encoder_layer_{i}.ln_1.*
blocks.{i}.attn.qkv.{weight,bias}       ...encoder_layer_{i}.self_attention.in_proj_{weight,bias}
blocks.{i}.attn.proj.*                  ...encoder_layer_{i}.self_attention.out_proj.*
blocks.{i}.norm2.*                      ...encoder_layer_{i}.ln_2.*
blocks.{i}.mlp.fc1.*  / mlp.fc2.*       ...encoder_layer_{i}.mlp.0.*  / mlp.3.*
norm.*                                  encoder.ln.*
head.*                                  heads.head.*
=====================================  =====================================================

Tensors are passed through unchanged (no copies). A head may be absent on either side.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "from_torchvision_state_dict",
    "to_torchvision_state_dict",
    "detect_layout",
    "StateDictLayoutError",
]

StateDict = dict[str, torch.Tensor]


class StateDictLayoutError(ValueError):
    """A state dict has keys that belong to neither (or not to the expected) layout."""


# (ours, torchvision) for the parameters outside the encoder blocks.
_TOP_LEVEL = [
    ("patch_embed.proj.weight", "conv_proj.weight"),
    ("patch_embed.proj.bias", "conv_proj.bias"),
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    ("norm.weight", "encoder.ln.weight"),
    ("norm.bias", "encoder.ln.bias"),
    ("head.weight", "heads.head.weight"),
    ("head.bias", "heads.head.bias"),
]

# (ours, torchvision) inside block i, after the block prefix.
_IN_BLOCK = [
    ("norm1.weight", "ln_1.weight"),
    ("norm1.bias", "ln_1.bias"),
    ("attn.qkv.weight", "self_attention.in_proj_weight"),
    ("attn.qkv.bias", "self_attention.in_proj_bias"),
    ("attn.proj.weight", "self_attention.out_proj.weight"),
    ("attn.proj.bias", "self_attention.out_proj.bias"),
    ("norm2.weight", "ln_2.weight"),
    ("norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.0.weight"),
    ("mlp.fc1.bias", "mlp.0.bias"),
    ("mlp.fc2.weight", "mlp.3.weight"),
    ("mlp.fc2.bias", "mlp.3.bias"),
]

_BLOCK_PREFIX = {"ours": "blocks.{i}.", "torchvision": "encoder.layers.encoder_layer_{i}."}
_BLOCK_RE = {
    "ours": re.compile(r"^blocks\.(\d+)\.(.+)$"),
    "torchvision": re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$"),
}
_SIDE = {"ours": 0, "torchvision": 1}


def _rename(state_dict: StateDict, source: str, target: str) -> StateDict:
    """Rename every key from the ``source`` layout to the ``target`` layout, or raise."""
    top = {pair[_SIDE[source]]: pair[_SIDE[target]] for pair in _TOP_LEVEL}
    in_block = {pair[_SIDE[source]]: pair[_SIDE[target]] for pair in _IN_BLOCK}
    out: StateDict = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in top:
            out[top[key]] = tensor
            continue
        match = _BLOCK_RE[source].match(key)
        if match and match.group(2) in in_block:
            prefix = _BLOCK_PREFIX[target].format(i=match.group(1))
            out[prefix + in_block[match.group(2)]] = tensor
            continue
        unknown.append(key)
    if unknown:
        hint = ""
        if any(k.startswith("patch_embed.stem.") for k in unknown):
            hint = " (a conv_stem model has no torchvision equivalent)"
        elif any(k.startswith("heads.pre_logits") for k in unknown):
            hint = " (torchvision's representation_size/pre_logits variant is not supported)"
        shown = ", ".join(unknown[:6]) + (" ..." if len(unknown) > 6 else "")
        raise StateDictLayoutError(
            f"{len(unknown)} key(s) are not part of the {source} ViT layout{hint}: {shown}"
        )
    return out


def from_torchvision_state_dict(state_dict: StateDict) -> StateDict:
    """torchvision ``vit_b_16``-style keys -> our keys (``heads.head`` may be present or not)."""
    return _rename(state_dict, "torchvision", "ours")


def to_torchvision_state_dict(state_dict: StateDict) -> StateDict:
    """Our keys -> torchvision keys; loadable by ``torchvision.models.vit_b_16()``."""
    return _rename(state_dict, "ours", "torchvision")


def detect_layout(state_dict: StateDict) -> str:
    """'ours' or 'torchvision', judged by the keys; raises ``StateDictLayoutError`` otherwise."""
    keys = list(state_dict)
    if any(k.startswith(("conv_proj.", "encoder.layers.", "class_token")) for k in keys):
        return "torchvision"
    if any(k.startswith(("patch_embed.", "blocks.", "cls_token")) for k in keys):
        return "ours"
    shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
    raise StateDictLayoutError(f"not a ViT state dict in our or torchvision's layout (keys: {shown or 'none'})")
