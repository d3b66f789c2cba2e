"""celluscan.models: our Vision Transformer, its registry, weight conversion and the model directory.

>>> from celluscan.models import create_model, save_model_dir, load_model_dir
>>> model = create_model("vit_test")                       # (B, 3, 32, 32) -> (B, 14)
"""

from celluscan.models.convert import from_torchvision_state_dict, to_torchvision_state_dict
from celluscan.models.finetune import apply_finetune_mode
from celluscan.models.model_dir import (
    ModelDirError,
    ModelDirInfo,
    load_model_dir,
    read_model_dir_info,
    save_model_dir,
    update_model_dir,
)
from celluscan.models.pretrained import PretrainedWeightsError, load_pretrained
from celluscan.models.registry import create_model, get_config, list_models
from celluscan.models.vit import ViTConfig, VisionTransformer, choose_fused_attn

__all__ = [
    "create_model",
    "list_models",
    "get_config",
    "ViTConfig",
    "VisionTransformer",
    "choose_fused_attn",
    "from_torchvision_state_dict",
    "to_torchvision_state_dict",
    "load_pretrained",
    "PretrainedWeightsError",
    "save_model_dir",
    "load_model_dir",
    "read_model_dir_info",
    "update_model_dir",
    "ModelDirInfo",
    "ModelDirError",
    "apply_finetune_mode",
]
