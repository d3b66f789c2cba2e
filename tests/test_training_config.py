"""Config loading, --set overrides, example stage configs, and the pieces the loop relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celluscan.cli import main
from celluscan.training import checkpoint as ckpt
from celluscan.training.config import ConfigError, load_config
from celluscan.training.ema import ModelEMA
from celluscan.training.mixup import BatchMixer
from celluscan.training.sampling import epoch_plan, rank_batches, step_seed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_match_the_original_recipe():
    cfg = load_config(None)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == ("adamw", 3e-4, 0.01, "constant")
    assert cfg.train.label_smoothing == 0 and cfg.train.mixup_alpha == 0 and cfg.train.ema_decay == 0


@pytest.mark.parametrize("name,fraction,epochs", [("stage1_sanity", 0.05, 3), ("stage2_tune", 0.2, 5),
                                                   ("stage3_full", 1.0, 7)])
def test_stage_configs_load(name, fraction, epochs):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.subset_fraction == fraction and cfg.train.epochs == epochs


def test_overrides_are_typed_by_the_field(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-4", "train.epochs=2", "train.compile=true", "model.pretrained=null",
                             "data.augment.zoom_range=[0.9, 1.2]", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 2 and cfg.train.compile is True and cfg.model.pretrained is None
    assert cfg.data.augment.zoom_range == (0.9, 1.2) and cfg.optim.betas == (0.9, 0.95)
    for bad, fragment in [("optim.lrate=1", "unknown key 'lrate'"), ("train.epochs=two", "expected an integer"),
                          ("data.sampler=random", "not one of"), ("optim.lr", "KEY=VALUE"),
                          ("train.batch_size=0", "must be positive")]:
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, [bad])


def test_bad_yaml_names_the_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:train.epocs: unknown key"):
        load_config(p)
    p.write_text("optim: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:optim.lr: expected a number"):
        load_config(p)


def test_train_cli_refuses_bad_starts(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--config", str(CONFIGS / "stage1_sanity.yaml"), "--set", "optim.lr=x"]) == 2


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 5)
    a, _ = epoch_plan(labels, 2, seed=7)
    assert np.array_equal(a, epoch_plan(labels, 2, seed=7)[0])
    assert not np.array_equal(a, epoch_plan(labels, 3, seed=7)[0])
    assert sorted(a.tolist()) == list(range(18))
    idx, flags = epoch_plan(labels, 0, seed=7, sampler="balanced")
    assert np.bincount(labels[idx]).tolist() == [10, 10, 10]
    assert flags.sum() == 12 and not flags[labels[idx] == 0].any()  # extra copies only
    cb, _ = epoch_plan(labels, 0, seed=7, sampler="class_balanced")
    assert cb.size == 18
    shards = [rank_batches(a, np.zeros(18, bool), 4, r, 2) for r in range(2)]
    seen = [np.concatenate([b[0] for b in s]) for s in shards]
    assert len(shards[0]) == len(shards[1]) and not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 18
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3) != step_seed(1, 2, 4)


def test_checkpoint_roundtrip_of_optimizer_and_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    tensors, data = ckpt.optimizer_tensors(opt)
    json.dumps(data)  # JSON, no pickle
    state = ckpt.rng_state()
    expected = torch.rand(3)
    ckpt.save_checkpoint(tmp_path, "step-00000001", {**tensors, "model.weight": model.weight},
                         {"optimizer": data, "rng": state})
    for step in (2, 3):
        ckpt.save_checkpoint(tmp_path, f"step-{step:08d}", {"x": torch.zeros(1)}, {}, keep_last=2)
    assert [p.name for p in ckpt.list_complete(tmp_path)] == ["step-00000002", "step-00000003"]
    ckpt.save_checkpoint(tmp_path, "step-00000004", {**tensors}, {"optimizer": data, "rng": state})
    loaded, meta, path = ckpt.load_latest(tmp_path)
    assert path.name == "step-00000004"
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    ckpt.load_optimizer(opt2, loaded, meta["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(opt2.state_dict()["state"][0][k], v)
    ckpt.set_rng_state(meta["rng"])
    assert torch.equal(torch.rand(3), expected)
    (path / "state.json").write_text("{garbled")  # a damaged newest checkpoint falls back
    assert ckpt.load_latest(tmp_path)[2].name == "step-00000003"


def test_ema_and_mixup():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.5)
    model.weight.data.fill_(1.0)
    ema.update(model, step=100)  # decay 0.5 -> halfway
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.5))
    assert ema.decay_at(0) == pytest.approx(0.1)  # warm-up forgets the initial weights fast
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for mixer in (BatchMixer(3, mixup_alpha=0.4), BatchMixer(3, cutmix_alpha=1.0), BatchMixer(3, label_smoothing=0.1)):
        mixed, targets = mixer(x, y)
        assert mixed.shape == x.shape and torch.allclose(targets.sum(1), torch.ones(6))
    _, t = BatchMixer(3, label_smoothing=0.3)(x, y)
    assert t[0].tolist() == pytest.approx([0.8, 0.1, 0.1])
