"""Fine-tuning modes: which parameters train, and that only those receive gradients."""

from __future__ import annotations

import pytest
import torch

from celluscan.models import apply_finetune_mode, create_model


def numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("vit_test", depth=3)


def test_linear_probe_trains_only_the_head(model):
    n = apply_finetune_mode(model, "linear_probe")
    assert n == numel([model.head]) == 32 * 14 + 14
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("head."), name


def test_full_trains_everything(model):
    apply_finetune_mode(model, "linear_probe")
    assert apply_finetune_mode(model, "full") == numel([model])


@pytest.mark.parametrize("last_n", [0, 1, 2, 3])
def test_last_n_blocks(model, last_n):
    n = apply_finetune_mode(model, "last_n_blocks", last_n=last_n)
    expected = [model.head, model.norm] + list(model.blocks)[3 - last_n:] if last_n else [model.head, model.norm]
    assert n == numel(expected)
    trainable = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks") else "")
                 for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", "norm"} | {f"blocks.{i}" for i in range(3 - last_n, 3)}


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        apply_finetune_mode(model, "partial")
    with pytest.raises(ValueError, match="between 0 and 3"):
        apply_finetune_mode(model, "last_n_blocks", last_n=4)
    with pytest.raises(ValueError, match="between 0 and 3"):
        apply_finetune_mode(model, "last_n_blocks")
    with pytest.raises(ValueError, match="only used with"):
        apply_finetune_mode(model, "full", last_n=2)


def test_torchvision_wrapper_supports_the_same_modes():
    with torch.device("meta"):
        model = create_model("torchvision_vit_b_16")
    assert apply_finetune_mode(model, "linear_probe") == 768 * 14 + 14
    block = sum(p.numel() for p in model.model.encoder.layers[-1].parameters())
    assert apply_finetune_mode(model, "last_n_blocks", last_n=1) == 768 * 14 + 14 + 2 * 768 + block
