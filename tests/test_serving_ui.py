"""Web UI without a browser: rendering, the single-cell and smear handlers, the mounted app."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from celluscan.inference.predictor import Prediction
from celluscan.serving.app import create_app
from celluscan.serving.knowledge import load_knowledge
from celluscan.serving.limits import ServingLimits
from celluscan.serving.service import FileResult, ModelService
from celluscan.serving.uploads import UploadError
from celluscan.serving.ui import (
    UNFAMILIAR_MESSAGE,
    UploadedImage,
    _Handlers,
    render_prediction_html,
    resolve_samples_dir,
    sample_images,
)
from celluscan.taxonomy import CLASSES, TAXONOMY
from test_serving_helpers import make_model_dir, png_bytes, zip_bytes

KB = load_knowledge()


def _prediction(top: list[tuple[str, float]], uncertain=False, reason="", group_answer="",
                unfamiliar=False) -> Prediction:
    rest = (1 - sum(p for _, p in top)) / (len(CLASSES) - len(top))
    probs = {c: dict(top).get(c, rest) for c in CLASSES}
    label = top[0][0]
    group = TAXONOMY.group_of(label)
    return Prediction(label=label, confidence=top[0][1], probs=probs, group=group,
                      group_name=TAXONOMY.groups[group].name, top_k=top, uncertain=uncertain,
                      uncertain_reason=reason, group_answer=group_answer, unfamiliar=unfamiliar,
                      unfamiliar_score=1.5)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("m") / "model", force_class="eosinophil")
    return ModelService.from_model_dir(model, ServingLimits(max_files=30, max_file_bytes=500_000))


# ---- rendering ----------------------------------------------------------------------------------


def test_confident_prediction_shows_label_group_and_top3():
    html = render_prediction_html(FileResult("a.png", prediction=_prediction(
        [("eosinophil", 0.91), ("basophil", 0.05), ("segmented_neutrophil", 0.02)])))
    assert "cs-headline'>Eosinophil<" in html
    assert "Lineage group: Eosinophil" in html and "91.0%" in html
    assert len(re.findall("cs-top3-row", html)) == 3
    assert "5.0%" in html and "2.0%" in html
    assert "unsure" not in html and UNFAMILIAR_MESSAGE not in html


def test_uncertain_prediction_shows_the_group_answer_instead_of_a_label():
    answer = "Granulocytic precursor: myelocyte or metamyelocyte — review recommended"
    html = render_prediction_html(FileResult("a.png", prediction=_prediction(
        [("myelocyte", 0.48), ("metamyelocyte", 0.41), ("promyelocyte", 0.05)], uncertain=True,
        reason="top classes are biologically adjacent (myelocyte vs metamyelocyte)",
        group_answer=answer)))
    assert f"cs-headline'>{answer}<" in html
    assert "The model is unsure" in html and "biologically adjacent" in html
    assert "cs-headline'>Myelocyte<" not in html


def test_uncertain_without_group_answer_still_avoids_a_confident_label():
    html = render_prediction_html(FileResult("a.png", prediction=_prediction(
        [("monocyte", 0.3), ("lymphocyte", 0.2), ("myeloblast", 0.1)], uncertain=True,
        reason="low confidence")))
    assert "cs-headline'>Monocytic: most likely monocyte, review recommended<" in html


def test_unfamiliar_banner():
    html = render_prediction_html(FileResult("a.png", prediction=_prediction(
        [("lymphocyte", 0.9), ("monocyte", 0.05), ("myeloblast", 0.01)], unfamiliar=True)))
    assert UNFAMILIAR_MESSAGE in html


def test_error_is_escaped():
    html = render_prediction_html(FileResult("<img src=x onerror=alert(1)>.png",
                                             error=UploadError("invalid_image", "not an image <b>")))
    assert "<img" not in html and "&lt;img" in html and "&lt;b&gt;" in html


# ---- handlers with the tiny model ---------------------------------------------------------------


def test_single_cell_handler(service):
    h = _Handlers(service, KB)
    html, overlay, card = h.cell(("cell.png", png_bytes(3, 50, 40)))
    assert "Eosinophil" in html and "cs-top3-row" in html
    assert isinstance(overlay, Image.Image) and overlay.size == (50, 40)
    assert card.startswith("### Eosinophil") and "not a diagnosis" in card
    html, overlay, card = h.cell(("broken.png", b"not an image"))
    assert "broken.png" in html and "not an image" in html and overlay is None and card == ""
    html, overlay, _ = h.cell(None)
    assert "first" in html and overlay is None


def test_smear_handler_counts_flags_and_writes_downloads(service, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"cell{i}.png"
        p.write_bytes(png_bytes(i))
        paths.append(str(p))
    z = tmp_path / "more.zip"
    z.write_bytes(zip_bytes({"x/a.png": png_bytes(7), "x/b.txt": b"text"}))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    paths += [str(z), str(bad)]
    calls = []
    flags, summary, diff_df, chart, preds_df, csvs = h_smear(service, paths, calls)
    assert "Eosinophils above 6%" in flags and "cs-flag review" in flags
    assert "**4** of 6 file(s) classified" in summary and "**2** could not be used" in summary
    group_row = diff_df[diff_df["Group"] == "Eosinophil"]
    class_row = diff_df[diff_df["Class"] == "Eosinophil"]
    assert list(group_row["Count"]) == [4] and list(class_row["Count"]) == [4]
    assert list(class_row["%"]) == [100.0] and diff_df["Count"].sum() == 8  # groups + classes
    assert list(preds_df["File"]) == ["cell0.png", "cell1.png", "cell2.png", "more.zip/x/a.png",
                                      "more.zip/x/b.txt", "bad.jpg"]
    assert preds_df["Error"].iloc[-1] and not preds_df["Error"].iloc[0]
    assert Image.open(chart).format == "PNG"
    pred_csv, diff_csv = (Path(p) for p in csvs)
    assert pred_csv.name.startswith("celluscan-predictions-") and pred_csv.suffix == ".csv"
    assert len(list(csv.DictReader(io.StringIO(pred_csv.read_text())))) == 6
    assert "flag:review" in diff_csv.read_text()
    assert calls and calls[-1] == (6, 6)  # progress reached the end


def h_smear(service, paths, calls):
    progress = lambda value, desc=None, unit=None: calls.append(value)  # noqa: E731
    return _Handlers(service, KB).smear(paths, progress=progress)


def test_smear_handler_refuses_too_many_files(service, tmp_path):
    z = tmp_path / "big.zip"
    z.write_bytes(zip_bytes({f"{i}.png": b"1" for i in range(31)}))
    flags, *rest = h_smear(service, [str(z)], [])
    assert "too many files" in flags and rest[1] is None


def test_uploaded_image_hands_over_bytes_without_decoding(tmp_path):
    comp = UploadedImage(type="filepath", image_mode=None, render=False)
    p = tmp_path / "up.png"
    p.write_bytes(b"raw bytes, not decoded")
    payload = SimpleNamespace(path=str(p), url=None, orig_name="../x/cell.png")
    assert comp.preprocess(payload) == ("cell.png", b"raw bytes, not decoded")
    pasted = SimpleNamespace(path=None, url="data:image/png;base64,aGVsbG8=", orig_name=None)
    assert comp.preprocess(pasted) == ("pasted image", b"hello")
    assert comp.preprocess(None) is None


def test_bundled_samples(tmp_path):
    (tmp_path / "lymphocyte").mkdir()
    (tmp_path / "lymphocyte" / "b.png").write_bytes(png_bytes(1))
    (tmp_path / "lymphocyte" / "a.png").write_bytes(png_bytes(2))
    (tmp_path / "lymphocyte" / "notes.txt").write_text("x")
    (tmp_path / "not_a_class").mkdir()
    assert sample_images(tmp_path) == [("lymphocyte", tmp_path / "lymphocyte" / "a.png")]
    assert sample_images(None) == []
    shipped = resolve_samples_dir()
    if shipped is not None:
        assert [c for c, _ in sample_images(shipped)] == list(CLASSES)


# ---- the mounted app ----------------------------------------------------------------------------


def test_app_with_ui_is_offline_and_has_safe_headers(service):
    c = TestClient(create_app(service))
    r = c.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    for header, value in (("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer")):
        assert r.headers[header] == value
    assert r.headers["x-frame-options"] in ("SAMEORIGIN", "DENY")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    # Nothing loaded from another origin: no external scripts or stylesheets, no web fonts.
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=[\"']https?://", r.text)
    config = c.get("/config").json()
    assert config["analytics_enabled"] is False and config["stylesheets"] == []
    theme = c.get("/theme.css").text
    assert "googleapis" not in theme and "system-ui" in theme
    assert c.get("/api/v1/health").json()["status"] == "ok"  # API still routed with the UI mounted
