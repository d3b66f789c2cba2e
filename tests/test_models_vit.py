"""Our ViT: shapes, gradients, the two attention paths, position-embedding resizing, conv stem, registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from celluscan.models import ViTConfig, VisionTransformer, choose_fused_attn, create_model, list_models
from celluscan.models.vit import resize_pos_embed


@pytest.fixture
def model() -> VisionTransformer:
    torch.manual_seed(0)
    return create_model("vit_test").eval()


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_shapes(model):
    x = images()
    cfg = model.config
    tokens = 1 + (32 // 8) ** 2
    assert model(x).shape == (3, 14)
    assert model.forward_features(x).shape == (3, cfg.embed_dim)
    assert model.forward_tokens(x).shape == (3, tokens, cfg.embed_dim)
    maps = model.attention_maps(x)
    assert len(maps) == cfg.depth
    for m in maps:
        assert m.shape == (3, cfg.num_heads, tokens, tokens)
        torch.testing.assert_close(m.sum(-1), torch.ones(3, cfg.num_heads, tokens))
    # features are the final-normed [CLS] token and the head maps them to the logits
    torch.testing.assert_close(model.head(model.forward_features(x)), model(x))


@pytest.mark.parametrize("conv_stem", [False, True])
def test_every_parameter_gets_a_gradient(conv_stem):
    torch.manual_seed(0)
    model = create_model("vit_test", conv_stem=conv_stem).train()
    loss = F.cross_entropy(model(images(4)), torch.tensor([0, 3, 7, 13]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("train", [False, True])
def test_explicit_and_fused_attention_agree(model, train):
    x = images(4)
    model.train(train)  # dropout is 0 in vit_test, so train mode is deterministic
    model.set_fused_attn(True)
    assert model.fused_attn
    fused_logits, fused_feats = model(x), model.forward_features(x)
    model.set_fused_attn(False)
    assert not model.fused_attn and not any(b.attn.fused_attn for b in model.blocks)
    explicit_logits, explicit_feats = model(x), model.forward_features(x)
    torch.testing.assert_close(explicit_logits, fused_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit_feats, fused_feats, atol=1e-5, rtol=0)


def test_fused_attn_override_and_per_dtype_choice():
    assert not create_model("vit_test", fused_attn=False).fused_attn
    assert create_model("vit_test").fused_attn
    assert choose_fused_attn(torch.bfloat16, "cpu") is False
    assert choose_fused_attn(torch.float32, "cpu") is True
    model = create_model("vit_test")
    assert model.set_attention_path_for(torch.bfloat16, "cpu").fused_attn is False
    assert model.set_attention_path_for(torch.float32, "cpu").fused_attn is True


@pytest.mark.parametrize("fused", [True, False])
def test_attention_maps_are_the_real_weights_and_leave_no_trace(model, fused):
    x = images(2)
    model.set_fused_attn(fused)
    block_inputs = []
    handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0]))
    maps = model.attention_maps(x)
    handle.remove()
    # recompute layer 1's attention by hand from its input
    attn = model.blocks[1].attn
    h = model.blocks[1].norm1(block_inputs[0])
    q, k, _ = attn.qkv(h).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim**0.5, dim=-1)
    torch.testing.assert_close(maps[1], expected)
    # the flag is restored and no hooks stay installed
    assert all(b.attn.fused_attn is fused for b in model.blocks)
    assert all(not b.attn.softmax._forward_hooks for b in model.blocks)


def test_pos_embed_load_time_interpolation_32_to_48():
    torch.manual_seed(0)
    small = create_model("vit_test").eval()  # 32 px: 4x4 grid
    big = create_model("vit_test", image_size=48).eval()  # 48 px: 6x6 grid
    big.load_state_dict(small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(big.pos_embed[:, 0], small.pos_embed[:, 0])  # [CLS] kept
    out = big(images(2, size=48))
    assert out.shape == (2, 14) and torch.isfinite(out).all()
    # the forward-time path (32 px model fed 48 px images) resizes identically
    torch.testing.assert_close(small(images(2, size=48)), out)


def test_forward_at_other_sizes_and_bad_sizes(model):
    assert model(images(2, size=64)).shape == (2, 14)
    assert model(torch.randn(1, 3, 24, 40)).shape == (1, 14)  # non-square grid
    assert model.attention_maps(images(1, size=48))[0].shape == (1, 2, 37, 37)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))


def test_resize_pos_embed_geometry():
    # a linear ramp over the grid stays (nearly) a ramp after upsampling; [CLS] untouched
    g = 4
    ramp = torch.arange(g, dtype=torch.float32).repeat(g, 1)  # value = column index
    pos = torch.cat([torch.full((1, 1, 1), 7.0), ramp.reshape(1, g * g, 1)], dim=1)
    out = resize_pos_embed(pos, (8, 8))
    assert out.shape == (1, 65, 1) and out[0, 0, 0] == 7.0
    grid = out[0, 1:, 0].reshape(8, 8)
    assert torch.all(grid[:, 1:] >= grid[:, :-1] - 1e-6)  # increasing left to right
    assert torch.allclose(grid[0], grid[5])  # rows identical
    assert resize_pos_embed(pos, (4, 4)) is pos
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.zeros(1, 1 + 15, 2), (4, 4))


def test_conv_stem_variant():
    torch.manual_seed(0)
    model = create_model("vit_test", conv_stem=True).eval()
    kinds = [type(m).__name__ for m in model.patch_embed.stem]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3  # log2(8) stride-2 stages
    assert all(m.stride == (2, 2) and m.kernel_size == (3, 3) for m in model.patch_embed.stem if hasattr(m, "stride"))
    assert model.patch_embed.proj.kernel_size == (1, 1)
    assert model.forward_tokens(images(2)).shape == (2, 17, 32)  # same token count as patchify
    assert model(images(2)).shape == (2, 14)
    with pytest.raises(ValueError, match="power-of-two"):
        create_model("vit_test", conv_stem=True, patch_size=6, image_size=36)


def test_registry():
    assert list_models() == ["vit_b_16", "vit_s_16", "vit_ti_16", "vit_test", "torchvision_vit_b_16"]
    with torch.device("meta"):
        shapes = {n: create_model(n).config for n in ["vit_b_16", "vit_s_16", "vit_ti_16"]}
    assert [(c.embed_dim, c.depth, c.num_heads, c.mlp_dim) for c in shapes.values()] == [
        (768, 12, 12, 3072), (384, 12, 6, 1536), (192, 12, 3, 768)]
    assert all(c.description and c.image_size == 224 for c in shapes.values())
    model = create_model("vit_test", num_classes=5, dropout=0.1, attention_dropout=0.2)
    assert model.head.out_features == 5 and model.config.dropout == 0.1
    assert model.blocks[0].attn.attn_drop.p == 0.2 and model.blocks[0].mlp.drop1.p == 0.1
    with pytest.raises(KeyError, match="unknown model"):
        create_model("vit_h_14")
    with pytest.raises(TypeError, match="unknown ViTConfig field"):
        create_model("vit_test", widht=3)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_model("vit_test", image_size=36)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(name="x", embed_dim=30, depth=1, num_heads=4, mlp_dim=8)


def test_vit_b_16_parameter_count_matches_torchvision():
    import torchvision

    with torch.device("meta"):
        ours = create_model("vit_b_16", num_classes=1000)
        theirs = torchvision.models.vit_b_16(weights=None)
    count = sum(p.numel() for p in ours.parameters())
    assert count == 86_567_656
    assert count == sum(p.numel() for p in theirs.parameters())


def test_drop_path_rates_training_only_and_per_sample():
    model = create_model("vit_test", num_classes=4, drop_path=0.5)
    rates = [block.drop_path.p for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(64, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # evaluation: stochastic depth is the identity
    model.train()
    last = model.blocks[-1].drop_path
    branch = torch.ones(256, 5, 8)
    out = last(branch)
    kept = out[:, 0, 0] > 0
    # whole samples are dropped or kept (scaled by 1/(1-p)), about half of them at p = 0.5
    assert torch.all((out == 0) | (out == 2.0))
    assert torch.all(out == out[:, :1, :1])
    assert 0.3 < kept.float().mean().item() < 0.7
    assert ViTConfig.from_dict(model.config.to_dict()).drop_path == 0.5
    with pytest.raises(ValueError, match="drop_path"):
        create_model("vit_test", drop_path=1.0)
