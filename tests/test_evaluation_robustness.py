"""Robustness measurement (issue 10): other labs' coarse-labelled images, synthetic shifts, the
unfamiliar flag, and `celluscan robustness` end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from test_training_support import cell_image, make_dataset

from celluscan.cli import main
from celluscan.evaluation.robustness import (
    SHIFTS,
    ExternalImage,
    external_report,
    scan_coarse_folder,
    shift_report,
    unfamiliar_report,
)
from celluscan.models import create_model, save_model_dir
from celluscan.taxonomy import CLASSES


def _pred(label, unfamiliar=False, score=0.0):
    return SimpleNamespace(label=label, unfamiliar=unfamiliar, unfamiliar_score=score)


def test_external_report_counts_coarse_hits_false_alarms_and_unflagged_alarms():
    img = lambda label, source: ExternalImage(Path(f"{source}_x.png"), label, source)  # noqa: E731
    preds = [
        (img("neutrophil", "a"), _pred("segmented_neutrophil")),  # coarse hit
        (img("neutrophil", "a"), _pred("band_neutrophil")),  # coarse hit
        (img("neutrophil", "a"), _pred("myeloblast", unfamiliar=True)),  # alarm, but flagged
        (img("neutrophil", "a"), _pred("myelocyte")),  # alarm shown as trustworthy
        (img("lymphocyte", "b"), _pred("lymphocyte")),
        (img("lymphocyte", "b"), _pred("monocyte", unfamiliar=True)),
    ]
    rep = external_report(preds)
    assert set(rep) == {"a", "b", "all"}
    a, everything = rep["a"], rep["all"]
    assert a["balanced_coarse_recall"] == pytest.approx(0.5)
    assert a["false_alarm_rate"] == pytest.approx(0.5)
    assert a["unflagged_false_alarm_rate"] == pytest.approx(0.25)
    assert a["strict_accuracy"] == 0.0  # no fine label equals the coarse "neutrophil"
    assert everything["coarse_recall_per_class"] == {"lymphocyte": 0.5, "neutrophil": 0.5}
    assert everything["balanced_coarse_recall"] == pytest.approx(0.5)
    assert everything["false_alarm_rate"] == pytest.approx(2 / 6)
    assert everything["unflagged_false_alarm_rate"] == pytest.approx(1 / 6)
    assert everything["unfamiliar_rate"] == pytest.approx(2 / 6)
    assert sum(everything["predicted_share"].values()) == pytest.approx(1.0)
    assert everything["predicted_share"]["segmented_neutrophil"] == pytest.approx(1 / 6)


def test_unfamiliar_report_auroc_and_flag_rates():
    own = [_pred("lymphocyte", s > 0.9, s) for s in (0.1, 0.2, 0.3, 0.95)]
    other = [_pred("lymphocyte", s > 0.9, s) for s in (0.5, 0.92, 0.99)]
    rep = unfamiliar_report(own, other)
    assert rep["auroc"] == pytest.approx(10 / 12)  # 10 of the 12 (own, other) pairs ordered right
    assert rep["flagged_in_distribution"] == pytest.approx(0.25)
    assert rep["flagged_external"] == pytest.approx(2 / 3)


def test_every_shift_keeps_an_rgb_image_and_changes_it():
    rng = np.random.default_rng(0)
    img = cell_image("eosinophil", rng, size=96)
    for name, shift in SHIFTS.items():
        out = shift(img)
        assert out.mode == "RGB" and min(out.size) > 8, name
        if name != "none":
            assert not np.array_equal(np.asarray(out.resize(img.size)), np.asarray(img)), name


def test_shift_report_scores_each_shift_with_the_given_predictor():
    images = [cell_image("lymphocyte", np.random.default_rng(i), size=64) for i in range(4)]
    # a "model" that is right only on unshifted images: it recognises them by identity
    originals = {np.asarray(im).tobytes() for im in images}
    predict = lambda ims: [_pred("lymphocyte" if np.asarray(im).tobytes() in originals else "basophil")  # noqa: E731
                           for im in ims]
    rep = shift_report(predict, images, ["lymphocyte"] * 4, shifts=["none", "blur_r2"])
    assert rep["none"]["accuracy"] == 1.0 and rep["blur_r2"]["accuracy"] == 0.0
    assert rep["blur_r2"]["group_accuracy"] == 0.0  # basophil vs lymphocyte: different lineages


def test_scan_coarse_folder_maps_folder_names_and_sources(tmp_path):
    rng = np.random.default_rng(0)
    for folder, name in [("Neutrophils", "labA_001.png"), ("lymphocyte", "labB_7.jpg"), ("lymphocyte", "plain.png")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        cell_image("neutrophil", rng).save(tmp_path / folder / name)
    (tmp_path / "lymphocyte" / "readme.txt").write_text("not an image")
    found = sorted((i.path.name, i.coarse_label, i.source) for i in scan_coarse_folder(tmp_path))
    assert found == [("labA_001.png", "neutrophil", "labA"), ("labB_7.jpg", "lymphocyte", "labB"),
                     ("plain.png", "lymphocyte", tmp_path.name)]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        scan_coarse_folder(tmp_path / "missing")


def test_robustness_cli_writes_the_tables_and_plot(tmp_path):
    dataset = make_dataset(tmp_path / "ds")
    ext = tmp_path / "ext"
    rng = np.random.default_rng(1)
    for label in ("neutrophil", "lymphocyte"):
        (ext / label).mkdir(parents=True)
        for i in range(3):
            cell_image(label, rng).save(ext / label / f"other_{i}.png")
    (ext / "lymphocyte" / "other_broken.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    model = save_model_dir(create_model("vit_test"), tmp_path / "model", CLASSES,
                           {"image_size": 32, "mean": [0.7, 0.6, 0.7], "std": [0.25, 0.25, 0.25]}, {})
    out = tmp_path / "out"
    rc = main(["robustness", "--model", str(model), "--external", str(ext), "--dataset", str(dataset),
               "--shift-images", "5", "--output-dir", str(out)])
    assert rc == 0
    rep = json.loads((out / "robustness.json").read_text())
    assert rep["shifts"]["images"] == 5 and set(rep["shifts"]["results"]) == set(SHIFTS)
    assert rep["external"]["all"]["images"] == 6  # the broken file is skipped, not fatal
    assert rep["unfamiliar"]["external_images"] == 6 and rep["unfamiliar"]["in_distribution_images"] == 5
    md = (out / "robustness.md").read_text()
    assert "false alarms not flagged" in md and "| other | 6 |" in md
    assert Image.open(out / "external_shares.png").size[0] > 100
