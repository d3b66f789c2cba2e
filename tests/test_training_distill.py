"""Distillation from teacher model directories (training.distill) on the tiny generated dataset."""

from __future__ import annotations

import pytest
import torch

from test_training_engine import data, dataset  # noqa: F401  (the tiny dataset fixtures)
from test_training_support import tiny_config

from celluscan.models import load_model_dir
from celluscan.models.model_dir import save_model_dir
from celluscan.models.registry import create_model
from celluscan.taxonomy import CLASSES
from celluscan.training.config import ConfigError, config_from_dict
from celluscan.training.distill import blend_targets, teacher_probabilities
from celluscan.training.engine import Trainer
from celluscan.training.mixup import BatchMixer, soft_targets

CANONICAL = {"framing": "nucleus", "colour": "none", "framing_scale": 3.0}


def _teacher(path, seed: int, temperature: float = 1.0, canonical=None, image_size: int = 32):
    torch.manual_seed(seed)
    model = create_model("vit_test", num_classes=len(CLASSES), image_size=image_size)
    prep = {"mean": [0.7, 0.6, 0.7], "std": [0.25, 0.25, 0.25], "temperature": temperature}
    if canonical:
        prep["canonical"] = canonical
    return save_model_dir(model, path, CLASSES, prep)


def test_blend_targets_mixes_label_and_teacher_distributions():
    labels = soft_targets(torch.tensor([0, 2]), 3, 0.0)
    teacher = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    out = blend_targets(labels, teacher, 0.25)
    assert torch.allclose(out, torch.tensor([[0.8, 0.075, 0.125], [0.15, 0.05, 0.8]]))
    assert torch.allclose(out.sum(dim=1), torch.ones(2))
    assert torch.equal(blend_targets(labels, teacher, 0.0), labels)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        blend_targets(labels, teacher, 1.5)


def test_mixer_mixes_given_targets_instead_of_the_labels():
    torch.manual_seed(0)
    mixer = BatchMixer(3, mixup_alpha=1.0, prob=1.0)
    images = torch.rand(2, 3, 8, 8)
    given = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    mixed, targets = mixer(images, torch.tensor([0, 1]), given)
    lam = float(((mixed[0] - images[1]) / (images[0] - images[1])).flatten()[0])  # mixed = lam*a + (1-lam)*b
    assert torch.allclose(targets, given * lam + given.flip(0) * (1 - lam), atol=1e-5)


def test_teacher_probabilities_average_temperature_scaled_teachers(tmp_path, data):
    a = _teacher(tmp_path / "a", 0, temperature=0.5)
    b = _teacher(tmp_path / "b", 1, temperature=2.0, image_size=16)  # another input size: resized
    images = data.train.images[:10]
    probs = teacher_probabilities([a, b], images, CLASSES, None, batch_size=4)
    assert probs.shape == (10, len(CLASSES))
    assert torch.allclose(probs.sum(dim=1), torch.ones(10), atol=1e-5)
    from celluscan.data.batch_augment import EvalPreprocess

    expected = []
    for path, size, t in ((a, 32, 0.5), (b, 16, 2.0)):
        model, _ = load_model_dir(path)
        with torch.no_grad():
            logits = model(EvalPreprocess(size, [0.7, 0.6, 0.7], [0.25, 0.25, 0.25])(images))
        expected.append(torch.softmax(logits / t, dim=1))
    assert torch.allclose(probs, (expected[0] + expected[1]) / 2, atol=1e-5)


def test_teachers_must_match_the_classes_and_the_cached_preprocessing(tmp_path, data):
    framed = _teacher(tmp_path / "framed", 0, canonical=CANONICAL)
    with pytest.raises(ValueError, match="framed.*canonical"):
        teacher_probabilities([framed], data.train.images[:2], CLASSES, None)
    assert teacher_probabilities([framed], data.train.images[:2], CLASSES, CANONICAL).shape == (2, len(CLASSES))
    with pytest.raises(ValueError, match="teacher classes"):
        teacher_probabilities([framed], data.train.images[:2], CLASSES[::-1], CANONICAL)


def test_trainer_distils_from_teachers(dataset, data, tmp_path):
    teacher = _teacher(tmp_path / "t", 0)
    cfg = config_from_dict(tiny_config(dataset, **{"train.epochs": 1, "train.distill_from": [str(teacher)],
                                                   "train.distill_weight": 1.0})).validate()
    trainer = Trainer(cfg, tmp_path / "run", data, log=lambda _m: None)
    expected = teacher_probabilities([teacher], data.train.images, trainer.class_names, None,
                                     amp_dtype=trainer.amp_dtype)  # as the trainer ran them
    assert torch.allclose(trainer.teacher_probs, expected)
    seen = []

    class SpyMixer:  # records the targets each step hands to the mixer
        def __init__(self, mixer):
            self.mixer = mixer

        def label_targets(self, labels):
            return self.mixer.label_targets(labels)

        def __call__(self, images, labels, targets=None):
            seen.append((labels.clone(), targets))
            return self.mixer(images, labels, targets)

    trainer.mixer = SpyMixer(trainer.mixer)
    trainer.fit()
    assert seen and all(t is not None for _, t in seen)
    # weight 1.0 and no mixing: each target row is the teacher's answer for one training image
    # with that row's label (not the label's one-hot)
    for labels, targets in seen:
        assert not torch.allclose(targets, soft_targets(labels, len(CLASSES), 0.0))
        for y, row in zip(labels, targets):
            candidates = trainer.teacher_probs[data.train.labels == y]
            assert torch.isclose(candidates, row, atol=1e-6).all(dim=1).any()
    _, info = load_model_dir(tmp_path / "run" / "model")
    assert info.metadata["training_config"]["train"]["distill_from"] == [str(teacher)]


def test_distill_weight_is_validated(dataset):
    with pytest.raises(ConfigError, match="distill_weight"):
        config_from_dict(tiny_config(dataset, **{"train.distill_weight": 1.5})).validate()
