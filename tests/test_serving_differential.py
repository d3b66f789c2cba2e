"""Differential counts, group totals, flag rules (incl. 'unreliable'), chart and CSV reports."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import pytest
from PIL import Image

from celluscan.inference.predictor import Prediction
from celluscan.serving.differential import compute_differential, plot_differential_png
from celluscan.serving.knowledge import load_knowledge
from celluscan.serving.report import differential_csv, differential_rows, predictions_csv
from celluscan.serving.service import FileResult
from celluscan.serving.uploads import UploadError
from celluscan.taxonomy import CLASSES, TAXONOMY

KB = load_knowledge()


@dataclass
class Cell:
    label: str
    uncertain: bool = False
    unfamiliar: bool = False


def cells(label: str, n: int, **kw) -> list[Cell]:
    return [Cell(label, **kw) for _ in range(n)]


def test_counts_percentages_and_group_totals():
    batch = cells("segmented_neutrophil", 6) + cells("band_neutrophil", 2) + cells("lymphocyte", 2)
    d = compute_differential(batch, KB)
    assert d.total == 10
    assert list(d.counts) == list(CLASSES)
    assert d.counts["segmented_neutrophil"] == 6 and d.counts["basophil"] == 0
    assert d.percentages["segmented_neutrophil"] == pytest.approx(60.0)
    assert d.group_counts["neutrophil"] == 8
    assert d.group_percentages["neutrophil"] == pytest.approx(80.0)
    assert d.group_percentages["lymphoid"] == pytest.approx(20.0)
    assert sum(d.group_counts.values()) == d.total
    assert sum(d.percentages.values()) == pytest.approx(100.0)


def test_blast_present_is_urgent_and_listed_first():
    batch = cells("myeloblast", 1) + cells("myelocyte", 1) + cells("segmented_neutrophil", 98)
    d = compute_differential(batch, KB)
    assert [(f.class_id, f.severity) for f in d.flags] == [("myeloblast", "urgent"), ("myelocyte", "review")]
    assert d.flags[0].text == "Blasts present: urgent review"
    assert d.flags[0].count == 1 and d.flags[0].percent == pytest.approx(1.0)


def test_percent_rules_fire_only_above_the_threshold():
    at = cells("eosinophil", 6) + cells("segmented_neutrophil", 94)  # exactly 6%: not above
    assert not compute_differential(at, KB).flags
    above = cells("eosinophil", 7) + cells("segmented_neutrophil", 93)
    (flag,) = compute_differential(above, KB).flags
    assert (flag.class_id, flag.rule, flag.threshold, flag.severity) == ("eosinophil", "above_percent", 6, "review")
    baso = cells("basophil", 3) + cells("segmented_neutrophil", 97)
    assert [f.class_id for f in compute_differential(baso, KB).flags] == ["basophil"]


def test_flag_mostly_from_unfamiliar_images_is_unreliable():
    batch = cells("myeloblast", 2, unfamiliar=True) + cells("myeloblast", 1) + cells("lymphocyte", 7)
    (flag,) = [f for f in compute_differential(batch, KB).flags if f.class_id == "myeloblast"]
    assert flag.severity == "unreliable" and flag.rule_severity == "urgent" and not flag.reliable
    assert flag.unfamiliar_count == 2
    assert flag.display_text().startswith("Unreliable: Blasts present")
    # Exactly half unfamiliar is not "mostly": the flag stays urgent.
    half = cells("myeloblast", 1, unfamiliar=True) + cells("myeloblast", 1) + cells("lymphocyte", 8)
    (flag,) = [f for f in compute_differential(half, KB).flags if f.class_id == "myeloblast"]
    assert flag.severity == "urgent"
    # Unfamiliar images of *other* classes do not make the blast flag unreliable.
    others = cells("myeloblast", 1) + cells("lymphocyte", 9, unfamiliar=True)
    (flag,) = [f for f in compute_differential(others, KB).flags if f.class_id == "myeloblast"]
    assert flag.severity == "urgent"


def test_unreliable_flags_sort_after_reliable_ones():
    batch = cells("myeloblast", 1, unfamiliar=True) + cells("metamyelocyte", 1) + cells("segmented_neutrophil", 30)
    d = compute_differential(batch, KB)
    assert [f.severity for f in d.flags] == ["review", "unreliable"]


def test_uncertain_counts_are_reported():
    batch = cells("myelocyte", 2, uncertain=True) + cells("myelocyte", 1) + cells("lymphocyte", 7)
    d = compute_differential(batch, KB)
    assert d.uncertain_count == 2
    assert "2 of them uncertain" in d.flags[0].display_text()


def test_empty_batch_and_unknown_label():
    d = compute_differential([], KB)
    assert d.total == 0 and not d.flags and all(v == 0 for v in d.percentages.values())
    with pytest.raises(ValueError, match="smudge"):
        compute_differential([Cell("smudge")], KB)


def test_to_dict_is_json_ready():
    import json

    d = compute_differential(cells("basophil", 1) + cells("lymphocyte", 2), KB).to_dict()
    text = json.dumps(d)
    assert '"flags"' in text and d["percentages"]["basophil"] == 33.33
    assert d["flags"][0]["message"].startswith("Basophils above 2%")


def test_chart_is_a_png_of_reasonable_size():
    png = plot_differential_png(compute_differential(cells("lymphocyte", 3) + cells("monocyte", 1), KB))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 500 and img.height > 300


def _prediction(label: str, p: float = 0.9) -> Prediction:
    rest = (1 - p) / 13
    probs = {c: (p if c == label else rest) for c in CLASSES}
    group = TAXONOMY.group_of(label)
    return Prediction(label=label, confidence=p, probs=probs, group=group,
                      group_name=TAXONOMY.groups[group].name, top_k=[(label, p)],
                      uncertain=False, uncertain_reason="", group_answer="", unfamiliar=False,
                      unfamiliar_score=0.1)


def test_csv_reports():
    results = [FileResult("a.png", prediction=_prediction("lymphocyte")),
               FileResult("=HYPERLINK(\"x\").png", error=UploadError("invalid_image", "not an image"))]
    rows = list(csv.DictReader(io.StringIO(predictions_csv(results))))
    assert rows[0]["class"] == "lymphocyte" and float(rows[0]["p_lymphocyte"]) == pytest.approx(0.9)
    assert rows[1]["error"] == "invalid_image: not an image" and rows[1]["class"] == ""
    assert rows[1]["filename"].startswith("'=")  # spreadsheet formula neutralised
    diff = compute_differential([r.prediction for r in results if r.ok] + cells("myeloblast", 1), KB)
    drows = list(csv.DictReader(io.StringIO(differential_csv(diff))))
    by_id = {(r["level"], r["id"]): r for r in drows}
    assert by_id[("group", "lymphoid")]["count"] == "1"
    assert by_id[("class", "myeloblast")]["percent"] == "50.0"
    assert by_id[("flag:urgent", "myeloblast")]["name"].startswith("Blasts present")
    assert [r["level"] for r in differential_rows(diff)].count("class") == len(CLASSES)
