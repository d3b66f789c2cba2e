"""`celluscan models`: the registry listing and the layer-by-layer summary."""

from __future__ import annotations

import re

from celluscan.cli import main
from celluscan.models import create_model, get_config, list_models
from celluscan.models.summary import count_flops


def analytic_vit_flops(dim, depth, mlp, patch, image, classes, in_ch=3) -> int:
    """2 x multiply-adds of patchify + blocks + head (what FlopCounterMode counts)."""
    n = (image // patch) ** 2
    t = n + 1
    macs = n * dim * in_ch * patch * patch  # patchify conv
    per_block = t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * mlp
    macs += depth * per_block + dim * classes
    return 2 * macs


def test_flops_match_the_analytic_count():
    assert count_flops(get_config("vit_b_16")) == analytic_vit_flops(768, 12, 3072, 16, 224, 14)
    assert count_flops(get_config("vit_test"), 64) == analytic_vit_flops(32, 2, 64, 8, 64, 14)


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert re.search(rf"^{name}\s", out, re.M), name
    b16 = next(line for line in out.splitlines() if line.startswith("vit_b_16 "))
    gflops = analytic_vit_flops(768, 12, 3072, 16, 224, 14) / 1e9
    assert f"{gflops:.2f}" in b16 and "85.81M" in b16
    assert "2 x MACs" in out


def test_models_summary_table(capsys):
    assert main(["models", "--summary", "vit_test", "--depth", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"softmax \(Softmax\)\s+1x2x17x17", out)
    assert re.search(r"head \(Linear\)\s+1x14\s+462\s+462", out)
    total = sum(p.numel() for p in create_model("vit_test").parameters())
    assert f"total params: {total:,}" in out

    assert main(["models", "--summary", "vit_test", "--image-size", "48", "--conv-stem"]) == 0
    out = capsys.readouterr().out
    assert "36 patches" in out and "stem (Sequential)" in out and re.search(r"1x37x32", out)


def test_models_summary_errors(capsys):
    assert main(["models", "--summary", "vit_huge"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["models", "--summary", "vit_test", "--image-size", "30"]) == 2
    assert "not a multiple" in capsys.readouterr().err
