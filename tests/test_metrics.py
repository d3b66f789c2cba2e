"""evaluation.metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from celluscan.evaluation.metrics import compute_metrics, expected_calibration_error, group_probs, reliability_bins
from celluscan.taxonomy import CLASS_TO_INDEX, CLASSES, TAXONOMY


def _onehot_probs(pred, c, conf=1.0):
    p = np.full((len(pred), c), (1 - conf) / (c - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_micro_macro_f1_and_confusion_by_hand():
    names = ["a", "b", "c"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    m = compute_metrics(y, _onehot_probs(pred, 3, 0.8), names)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # recalls: a 3/4, b 1/2, c 1 -> macro accuracy 0.75
    assert m["macro_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # precisions: a 3/4, b 1/2, c 1; F1 a 0.75, b 0.5, c 1
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    assert m["macro_f1"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    # every confidence is 0.8: ECE = |0.8 - 0.75|
    assert m["ece"] == pytest.approx(0.05, abs=1e-6)
    assert m["nll"] == pytest.approx(-(6 * np.log(0.8) + 2 * np.log(0.1)) / 8)
    assert "group" not in m  # not the canonical classes


def test_macro_averages_only_over_classes_present():
    names = ["a", "b", "c", "d"]
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 3, 1, 1])  # one 'a' predicted as absent class 'd'
    m = compute_metrics(y, _onehot_probs(pred, 4, 0.9), names)
    assert m["classes_present"] == ["a", "b"]
    assert m["macro_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["per_class"]["d"]["predicted"] == 1


def test_group_level_sums_probabilities_within_lineage_groups():
    band, seg = CLASS_TO_INDEX["band_neutrophil"], CLASS_TO_INDEX["segmented_neutrophil"]
    lym = CLASS_TO_INDEX["lymphocyte"]
    y = np.array([band, seg, lym])
    p = np.zeros((3, len(CLASSES)))
    p[0, seg], p[0, lym] = 0.45, 0.55 - 0.2  # wrong class; neutrophil group 0.45+0.2 wins below
    p[0, band] = 0.2
    p[1, band], p[1, seg] = 0.6, 0.4  # band vs segmented: wrong class, right group
    p[2, lym] = 1.0
    m = compute_metrics(y, p, CLASSES)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["group"]["accuracy"] == pytest.approx(1.0)
    gi = TAXONOMY.group_names().index("neutrophil")
    assert group_probs(p, TAXONOMY.group_index_map(), len(TAXONOMY.group_names()))[1, gi] == pytest.approx(1.0)


def test_reliability_bins_reproduce_torchmetrics_ece():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) * 2
    logits[np.arange(300), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    bins = reliability_bins(y, p)
    assert sum(bins["count"]) == 300 and len(bins["count"]) == 15
    ece = sum(n * abs(c - a) for n, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"]) if n) / 300
    assert ece == pytest.approx(expected_calibration_error(y, p), abs=1e-6)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="labels"):
        compute_metrics([0, 5], np.full((2, 3), 1 / 3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="class names"):
        compute_metrics([0, 1], np.full((2, 3), 1 / 3), ["a", "b"])
