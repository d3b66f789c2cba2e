"""The unfamiliar-image detector: fitting, thresholding, AUROC, and the predictor using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from celluscan.evaluation.ood import (
    auroc,
    choose_threshold,
    fit_mahalanobis,
    mahalanobis_min_distance,
    save_ood,
)


def _clusters(n_per_class=200, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 5
    feats = torch.cat([centres[c] + torch.randn(n_per_class, d, generator=g) for c in range(classes)])
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return feats, labels, centres


def test_mahalanobis_scores_far_points_higher_than_cluster_points():
    feats, labels, centres = _clusters()
    stats = fit_mahalanobis(feats, labels, num_classes=4)  # class 3 has no samples: ignored
    near = centres + 0.1
    far = centres.mean(0, keepdim=True) + torch.full((1, feats.shape[1]), 40.0)
    assert mahalanobis_min_distance(far, stats).min() > mahalanobis_min_distance(near, stats).max() * 10
    # with unit covariance the squared distance of a point at the centre is ~0
    assert float(mahalanobis_min_distance(centres, stats).max()) < 0.5


def test_degenerate_features_still_fit():
    feats = torch.ones(5, 4)  # every training image gives the same features
    stats = fit_mahalanobis(feats, torch.zeros(5, dtype=torch.long), num_classes=2)
    assert torch.isfinite(stats.precision).all()
    assert float(mahalanobis_min_distance(feats, stats).max()) < 1e-3
    assert float(mahalanobis_min_distance(feats + 1, stats).min()) > 1.0


def test_threshold_flags_the_requested_share_of_in_distribution_scores():
    scores = torch.arange(1000, dtype=torch.float32)
    t = choose_threshold(scores, 0.05)
    flagged = float((scores > t).float().mean())
    assert 0.04 <= flagged <= 0.0501


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 50), rng.normal(1, 1, 40)
    pairwise = np.mean([(y > x) + 0.5 * (y == x) for x in a for y in b])
    assert auroc(a, b) == pytest.approx(pairwise)
    assert auroc([0, 0], [0, 0]) == pytest.approx(0.5)
    assert auroc([0, 1], [2, 3]) == pytest.approx(1.0)


def test_predictor_flags_images_unlike_the_fitted_features(tmp_path):
    from celluscan.inference.predictor import Predictor
    from celluscan.models import create_model, save_model_dir
    from celluscan.taxonomy import CLASSES

    torch.manual_seed(0)
    model = create_model("vit_test", num_classes=len(CLASSES))
    prep = {"image_size": 32, "pad_fill": "edge", "mean": [0.5] * 3, "std": [0.25] * 3}
    model_dir = save_model_dir(model, tmp_path / "m", class_names=list(CLASSES), preprocessing=prep, metadata={})
    rng = np.random.default_rng(0)
    familiar = [Image.fromarray(rng.integers(100, 156, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    with torch.no_grad():
        x = torch.stack([model_input(prep, im) for im in familiar])
        feats = model.eval().forward_features(x)
    stats = fit_mahalanobis(feats, torch.zeros(len(familiar), dtype=torch.long), len(CLASSES))
    stats.threshold = choose_threshold(mahalanobis_min_distance(feats, stats), 0.05)
    save_ood(model_dir, stats)

    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    odd = [Image.new("RGB", (32, 32), (255, 0, 255)), Image.new("RGB", (32, 32), (0, 255, 0))]
    preds_odd = predictor.predict_images(odd)
    preds_familiar = predictor.predict_images(familiar)
    assert all(p.unfamiliar for p in preds_odd)
    assert np.mean([p.unfamiliar for p in preds_familiar]) <= 0.1
    assert min(p.unfamiliar_score for p in preds_odd) > max(p.unfamiliar_score for p in preds_familiar)


def model_input(prep, image):
    """The normalised tensor the predictor feeds the model for one image."""
    from celluscan.data.transforms import preprocess

    arr = np.asarray(preprocess(image, prep["image_size"], prep.get("pad_fill", "edge")), dtype=np.float32) / 255
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(prep["mean"]).view(3, 1, 1)
    std = torch.tensor(prep["std"]).view(3, 1, 1)
    return (x - mean) / std
