"""The training engine in-process on a tiny generated dataset (vit_test, 32 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_training_support import TINY_CLASSES, make_dataset, tiny_config

from celluscan.models import load_model_dir
from celluscan.taxonomy import CLASS_TO_INDEX
from celluscan.training.config import config_from_dict
from celluscan.training.data_source import load_train_data
from celluscan.training.engine import Trainer, weights_digest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("engine") / "ds")


@pytest.fixture(scope="module")
def data(dataset):
    return load_train_data(dataset, 32, workers=1)


def _cfg(dataset, **overrides):
    return config_from_dict(tiny_config(dataset, **overrides)).validate()


def _quiet(_msg):
    pass


def test_load_train_data_splits_and_subset(dataset, data):
    assert (len(data.train), len(data.val), len(data.test)) == (32, 12, 8)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert set(data.train.labels.tolist()) == {CLASS_TO_INDEX[c] for c in TINY_CLASSES}
    subset = load_train_data(dataset, 32, subset_fraction=0.25, workers=1)
    assert len(subset.train) == 8 and len(subset.val) == 12  # 2 per class; val untouched
    assert sorted(subset.train.labels.tolist()) == sorted(CLASS_TO_INDEX[c] for c in TINY_CLASSES for _ in range(2))


def test_training_reduces_loss_and_exports_best_model(dataset, data, tmp_path):
    cfg = _cfg(dataset, **{"train.epochs": 4, "optim.lr": 3e-3})
    trainer = Trainer(cfg, tmp_path / "run", data, log=_quiet)
    history = trainer.fit()
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[0] - 0.3, losses
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_accuracy"] > 0.5  # 4 classes: chance is 0.25
    run = tmp_path / "run"
    saved = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in saved] == [1, 2, 3, 4]
    best = max(history, key=lambda h: h["val_macro_f1"])
    model, info = load_model_dir(run / "model")
    assert info.metadata["epoch"] == best["epoch"]  # first epoch reaching the best val macro-F1
    assert info.metadata["val_macro_f1"] == pytest.approx(best["val_macro_f1"])
    assert info.preprocessing["mean"] == pytest.approx([0.7, 0.6, 0.7])
    assert info.preprocessing["temperature"] == pytest.approx(info.metadata["calibration"]["temperature"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"]["val_ece_after"] <= metrics["calibration"]["val_ece_before"] + 1e-9
    assert metrics["test"]["n"] == 8
    for name in ("loss", "accuracy", "confusion_counts", "confusion_normalised", "reliability", "reliability_val"):
        with Image.open(run / "plots" / f"{name}.png") as im:
            assert im.size[0] > 100
    table = (run / "test" / "per_class.md").read_text()
    assert "| Basophil (`basophil`) | 2 |" in table and "## Lineage groups" in table


def test_init_from_starts_from_the_model_dir(dataset, data, tmp_path):
    first = Trainer(_cfg(dataset, **{"train.epochs": 1}), tmp_path / "a", data, log=_quiet)
    first.fit()
    exported, _ = load_model_dir(tmp_path / "a" / "model")
    second = Trainer(_cfg(dataset, **{"train.epochs": 1}), tmp_path / "b", data, init_from=tmp_path / "a" / "model",
                     log=_quiet)
    assert weights_digest(second.model) == weights_digest(exported)
    fresh = Trainer(_cfg(dataset, **{"train.epochs": 1}), tmp_path / "c", data, log=_quiet)
    assert weights_digest(fresh.model) != weights_digest(exported)
    wrong = _cfg(dataset, **{"train.epochs": 1})
    wrong.model.conv_stem = True
    with pytest.raises(ValueError, match="conv_stem"):
        Trainer(wrong, tmp_path / "d", data, init_from=tmp_path / "a" / "model", log=_quiet)


def test_linear_probe_trains_only_the_head(dataset, data, tmp_path):
    cfg = _cfg(dataset, **{"train.epochs": 1})
    cfg.model.finetune = "linear_probe"
    trainer = Trainer(cfg, tmp_path / "run", data, log=_quiet)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_modern_recipe_runs_end_to_end(dataset, data, tmp_path):
    cfg = _cfg(dataset, **{"train.epochs": 2})
    cfg.optim.schedule, cfg.optim.warmup_epochs, cfg.optim.no_decay_norm_bias = "cosine", 0.5, True
    t = cfg.train
    t.label_smoothing, t.grad_clip, t.mixup_alpha, t.cutmix_alpha, t.ema_decay = 0.1, 1.0, 0.2, 1.0, 0.9
    cfg.data.sampler, cfg.data.balance_target = "balanced", 10
    trainer = Trainer(cfg, tmp_path / "run", data, log=_quiet)
    assert trainer.steps_per_epoch == 5  # 4 classes x 10 images / batch 8
    lrs = [trainer.schedule(s) for s in range(10)]
    assert lrs[0] < lrs[2] and lrs[2] == pytest.approx(cfg.optim.lr) and lrs[-1] < lrs[3]
    history = trainer.fit()
    assert [h["train_images"] for h in history] == [40, 40]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    exported, info = load_model_dir(tmp_path / "run" / "model")
    assert info.metadata["ema"] is True
    # The EMA weights (validated and exported) lag behind the raw weights.
    assert weights_digest(trainer.ema.module) != weights_digest(trainer.model)


def test_bad_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        load_train_data(tmp_path, 32)


def test_stop_after_cuts_the_run_but_keeps_the_schedule(dataset, data, tmp_path):
    full = Trainer(_cfg(dataset, **{"train.epochs": 4}), tmp_path / "full", data, log=_quiet)
    cut = Trainer(_cfg(dataset, **{"train.epochs": 4, "train.stop_after": 2}), tmp_path / "cut", data, log=_quiet)
    history = cut.fit()
    assert [h["epoch"] for h in history] == [1, 2]
    assert cut.schedule.total_steps == full.schedule.total_steps  # laid out for 4 epochs
    assert history[-1]["lr"] > 0.2 * cut.cfg.optim.lr  # not annealed: the cosine was cut mid-way
    with pytest.raises(Exception, match="stop_after"):
        _cfg(dataset, **{"train.stop_after": -1})


def test_canonical_preprocessing_travels_into_the_model_dir(dataset, tmp_path):
    canonical = {"framing": "nucleus", "colour": "white_balance", "framing_scale": 3.0}
    data = load_train_data(dataset, 32, workers=1, canonical=canonical)
    plain = load_train_data(dataset, 32, workers=1)
    assert not torch.equal(data.train.images, plain.train.images)
    assert data.mean != plain.mean  # recomputed on the canonical training images
    cfg = _cfg(dataset, **{"train.epochs": 1, "data.canonical": canonical})
    Trainer(cfg, tmp_path / "run", data, log=_quiet).fit()
    _, info = load_model_dir(tmp_path / "run" / "model")
    assert info.preprocessing["canonical"]["framing"] == "nucleus"
    assert info.preprocessing["canonical"]["colour"] == "white_balance"
    assert info.preprocessing["mean"] == pytest.approx(data.mean)


def test_colour_stage_batch_caches_the_framing_and_colours_each_batch(dataset, tmp_path):
    canonical = {"framing": "nucleus", "colour": "reinhard", "framing_scale": 3.0}
    framed = load_train_data(dataset, 32, workers=1, canonical={**canonical, "colour": "none"})
    cached = load_train_data(dataset, 32, workers=1, canonical=canonical)
    batched = load_train_data(dataset, 32, workers=1, canonical=canonical, colour_stage="batch")
    assert torch.equal(batched.train.images, framed.train.images)  # the cache holds the framing only
    assert not torch.equal(cached.train.images, framed.train.images)
    assert (batched.batch_colour, cached.batch_colour) == ("reinhard", "none")
    assert batched.canonical["colour"] == "reinhard"  # what inference will do
    assert batched.mean != framed.mean  # measured after the colour step
    assert batched.mean == pytest.approx(cached.mean, abs=0.03)  # ... so close to the cached variant's
    with pytest.raises(ValueError, match="per batch"):
        load_train_data(dataset, 32, workers=1, canonical={**canonical, "colour": "grey"}, colour_stage="batch")
    cfg = _cfg(dataset, **{"train.epochs": 1, "data.canonical": canonical, "data.colour_stage": "batch"})
    trainer = Trainer(cfg, tmp_path / "run", batched, log=_quiet)
    assert trainer.augment.colour == trainer.eval_pre.colour == "reinhard"
    trainer.fit()
    _, info = load_model_dir(tmp_path / "run" / "model")
    assert info.preprocessing["canonical"]["colour"] == "reinhard"
