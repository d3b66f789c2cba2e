"""`celluscan evaluate` on folder trees (fine and coarse labels) and manifests."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from test_training_support import cell_image, make_dataset

from celluscan.cli import main
from celluscan.models import create_model, save_model_dir
from celluscan.taxonomy import CLASSES, TAXONOMY

REPORT_FILES = ("metrics.json", "per_class.md", "predictions.csv", "confusion_counts.png",
                "confusion_normalised.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval") / "model"
    save_model_dir(create_model("vit_test"), path, CLASSES,
                   {"image_size": 32, "mean": [0.7, 0.6, 0.7], "std": [0.25, 0.25, 0.25]}, {})
    return path


def _tree(root, folders: dict[str, str], n: int = 3):
    """Folder-per-class tree; ``folders`` maps folder name -> the label used to draw images."""
    rng = np.random.default_rng(0)
    for folder, label in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            cell_image(label, rng).save(root / folder / f"img_{i}.png")
    return root


def _predictions(out):
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_folder_tree_with_other_label_names_and_a_broken_file(tmp_path, model_dir, capsys):
    data = _tree(tmp_path / "data", {"Lymphocytes": "lymphocyte", "eosinophiles": "eosinophil"})
    (data / "Lymphocytes" / "broken.png").write_bytes(b"not an image")
    (data / "eosinophiles" / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    assert main(["evaluate", str(data), "--model", str(model_dir), "--output-dir", str(out)]) == 0
    for name in REPORT_FILES + ("reliability.png",):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 7 and metrics["evaluated"] == 6
    assert [e["path"] for e in metrics["errors"]] == [str(data / "Lymphocytes" / "broken.png")]
    assert metrics["classes_present"] == ["eosinophil", "lymphocyte"]
    rows = _predictions(out)
    assert len(rows) == 7
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["path"].endswith("broken.png")
    good = [r for r in rows if not r["error"]]
    assert {r["label"] for r in good} == {"lymphocyte", "eosinophil"}
    # metrics.json agrees with the per-file predictions
    assert metrics["accuracy"] == pytest.approx(np.mean([r["predicted"] == r["label"] for r in good]))
    assert sum(map(sum, metrics["confusion_matrix"])) == 6
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in good])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert "broken.png" in (out / "per_class.md").read_text()
    assert "1 unreadable" in capsys.readouterr().out


def test_coarse_labels_count_any_neutrophil_as_a_hit(tmp_path, model_dir):
    data = _tree(tmp_path / "ext", {"neutrophil": "neutrophil", "Lymphocyte": "lymphocyte"}, n=4)
    out = tmp_path / "out"
    assert main(["evaluate", str(data), "--model", str(model_dir), "--output-dir", str(out), "--coarse"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = _predictions(out)
    coarse = metrics["coarse"]
    hits = {lab: [TAXONOMY.coarse_match(lab, r["predicted"]) for r in rows if r["label"] == lab]
            for lab in ("neutrophil", "lymphocyte")}
    assert coarse["per_label"]["neutrophil"]["recall"] == pytest.approx(np.mean(hits["neutrophil"]))
    assert coarse["balanced_recall"] == pytest.approx((np.mean(hits["neutrophil"]) + np.mean(hits["lymphocyte"])) / 2)
    assert coarse["strict_accuracy"] == pytest.approx(np.mean([r["predicted"] == r["label"] for r in rows]))
    assert all(r["coarse_hit"] == str(int(TAXONOMY.coarse_match(r["label"], r["predicted"]))) for r in rows)
    for name in REPORT_FILES:
        assert (out / name).exists(), name
    assert "Coarse labels" in (out / "per_class.md").read_text()


def test_coarse_recall_counts_band_and_segmented_as_neutrophil():
    from celluscan.evaluation.cli import coarse_metrics

    m = coarse_metrics(["neutrophil"] * 4 + ["lymphocyte"] * 2,
                       ["band_neutrophil", "segmented_neutrophil", "neutrophil", "monocyte", "lymphocyte", "myeloblast"])
    assert m["per_label"]["neutrophil"]["recall"] == 0.75
    assert m["per_label"]["neutrophil"]["strict_recall"] == 0.25
    assert m["balanced_recall"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["strict_accuracy"] == pytest.approx(2 / 6)


def test_manifest_split_and_unknown_labels(tmp_path, model_dir, capsys):
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    assert main(["evaluate", str(ds), "--model", str(model_dir), "--output-dir", str(out), "--split", "test"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated"] == 8 and metrics["split"] == "test"
    assert "group" in metrics

    data = _tree(tmp_path / "odd", {"lymphocyte": "lymphocyte", "smudge_things": "lymphocyte"}, n=2)
    assert main(["evaluate", str(data), "--model", str(model_dir), "--output-dir", str(tmp_path / "o2")]) == 2
    assert "smudge_things" in capsys.readouterr().err
    assert main(["evaluate", str(data), "--model", str(model_dir), "--output-dir", str(tmp_path / "o3"),
                 "--skip-unknown"]) == 0
    m = json.loads((tmp_path / "o3" / "metrics.json").read_text())
    assert m["evaluated"] == 2 and m["unknown_labels"] == {"smudge_things": 2}


def test_unfamiliar_flags_per_file_and_accuracy_with_and_without_them(tmp_path):
    from celluscan.evaluation.ood import fit_mahalanobis, save_ood

    torch.manual_seed(0)
    model = create_model("vit_test")
    path = save_model_dir(model, tmp_path / "model", CLASSES,
                          {"image_size": 32, "mean": [0.7, 0.6, 0.7], "std": [0.25, 0.25, 0.25]}, {})
    feats = torch.randn(64, model.config.embed_dim)
    stats = fit_mahalanobis(feats, torch.zeros(64, dtype=torch.long), len(CLASSES))
    data = _tree(tmp_path / "data", {"lymphocyte": "lymphocyte", "eosinophil": "eosinophil",
                                     "basophil": "basophil"}, n=4)

    def evaluate(threshold, out):
        stats.threshold = threshold
        save_ood(path, stats)
        assert main(["evaluate", str(data), "--model", str(path), "--output-dir", str(out)]) == 0
        return json.loads((out / "metrics.json").read_text())["unfamiliar"], _predictions(out)

    summary, rows = evaluate(float("inf"), tmp_path / "none")
    assert summary["flagged"] == 0 and {r["unfamiliar"] for r in rows} == {"false"}
    assert summary["accuracy_flagged"] is None
    scores = sorted(float(r["unfamiliar_score"]) for r in rows)
    threshold = (scores[5] + scores[6]) / 2  # flag the 6 least familiar of 12
    summary, rows = evaluate(threshold, tmp_path / "half")
    flagged = [r for r in rows if r["unfamiliar"] == "true"]
    assert len(flagged) == summary["flagged"] == 6 and summary["flagged_rate"] == pytest.approx(0.5)
    assert all(float(r["unfamiliar_score"]) > threshold for r in flagged)
    kept = [r for r in rows if r["unfamiliar"] == "false"]
    assert summary["accuracy_not_flagged"] == pytest.approx(np.mean([r["correct"] == "1" for r in kept]))
    assert summary["accuracy_flagged"] == pytest.approx(np.mean([r["correct"] == "1" for r in flagged]))
    assert "6 of 12 images flagged unfamiliar" in (tmp_path / "half" / "per_class.md").read_text()


def test_without_model_evaluates_the_shipped_model(tmp_path, capsys):
    from pathlib import Path

    import celluscan

    samples = Path(celluscan.__file__).parent / "assets" / "samples"
    data = tmp_path / "data"
    for label in ("lymphocyte", "eosinophil"):
        (data / label).mkdir(parents=True)
        for f in sorted((samples / label).iterdir()):
            (data / label / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    assert main(["evaluate", str(data), "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "shipped default" and metrics["evaluated"] == metrics["images"] >= 4
    assert metrics["accuracy"] >= 0.75  # the shipped model knows these classes' samples
    assert "unfamiliar" in metrics and "flagged unfamiliar" in capsys.readouterr().out
