"""torchvision <-> ours: the key mapping, and logits equality for ViT-B/16 with random weights.

The ViT-B/16 tests build each model once (module fixtures) and run one forward on batch 2.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from celluscan.models import create_model, from_torchvision_state_dict, to_torchvision_state_dict
from celluscan.models.convert import StateDictLayoutError, detect_layout


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every floating tensor random (LayerNorm scales around 1), so no weight is trivially 0 or 1.
    torchvision zero-initialises its head, which would make any logits comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.02
            p.copy_(1.0 + noise if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
                    else noise)


@pytest.fixture(scope="module")
def tv_model():
    return torchvision.models.vit_b_16(weights=None).eval()


@pytest.fixture(scope="module")
def our_model():
    return create_model("vit_b_16", num_classes=1000).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def compare_both_paths(ours, tv, x):
    with torch.no_grad():
        expected = tv(x)
        assert expected.abs().max() > 0.1  # a meaningful comparison, not zeros vs zeros
        for fused in (True, False):
            ours.set_fused_attn(fused)
            torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0, msg=f"fused_attn={fused}")
    ours.set_fused_attn(True)


def test_torchvision_to_ours_logits_equal(tv_model, our_model, x):
    randomize(tv_model, seed=1)
    our_model.load_state_dict(from_torchvision_state_dict(tv_model.state_dict()), strict=True)
    compare_both_paths(our_model, tv_model, x)


def test_ours_to_torchvision_logits_equal(tv_model, our_model, x):
    randomize(our_model, seed=2)
    tv_model.load_state_dict(to_torchvision_state_dict(our_model.state_dict()), strict=True)
    compare_both_paths(our_model, tv_model, x)


def test_stock_torchvision_wrapper_shares_the_conversion(tv_model, our_model, x):
    randomize(our_model, seed=3)
    wrapper = create_model("torchvision_vit_b_16", num_classes=1000).eval()
    assert type(wrapper.model) is type(tv_model)
    wrapper.load_canonical_state_dict(our_model.canonical_state_dict())
    stored = wrapper.canonical_state_dict()  # what a model directory would store
    assert stored.keys() == our_model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in our_model.state_dict().items())
    small = x[:1]
    with torch.no_grad():
        torch.testing.assert_close(wrapper(small), our_model(small), atol=1e-4, rtol=0)
        theirs, ours = wrapper.attention_maps(small), our_model.attention_maps(small)
    assert len(theirs) == 12 and theirs[0].shape == (1, 12, 197, 197)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_key_mapping_round_trip_and_head_optional():
    torch.manual_seed(0)
    ours = create_model("vit_test").state_dict()
    tv = to_torchvision_state_dict(ours)
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in tv
    assert tv["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"] is ours["blocks.1.attn.qkv.weight"]
    assert "heads.head.weight" in tv and "conv_proj.weight" in tv
    back = from_torchvision_state_dict(tv)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)
    headless = {k: v for k, v in tv.items() if not k.startswith("heads.")}
    assert not any(k.startswith("head.") for k in from_torchvision_state_dict(headless))
    assert detect_layout(tv) == "torchvision" and detect_layout(ours) == "ours"


def test_unmappable_keys_raise():
    with pytest.raises(StateDictLayoutError, match="conv_stem"):
        to_torchvision_state_dict(create_model("vit_test", conv_stem=True).state_dict())
    with pytest.raises(StateDictLayoutError, match="pre_logits"):
        from_torchvision_state_dict({"heads.pre_logits.weight": torch.zeros(1)})
    with pytest.raises(StateDictLayoutError, match="not a ViT state dict"):
        detect_layout({"fc.weight": torch.zeros(1)})
