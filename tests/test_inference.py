"""Predictor, uncertainty, unfamiliar-image scoring, attention rollout and the loading pipeline."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from celluscan.data.imageio import ImageLoadError
from celluscan.data.transforms import preprocess
from celluscan.inference import (
    ModelNotFoundError,
    OODScorer,
    Predictor,
    UncertaintyPolicy,
    assess_uncertainty,
    attention_rollout,
    energy_score,
    mahalanobis_score,
    overlay_heatmap,
)
from celluscan.inference import predictor as predictor_module
from celluscan.inference.backends import (
    JIT_PATHS,
    TORCH_PATHS,
    ExecutionPath,
    Float32,
    TorchRunner,
    cpu_supports_bf16,
)
from celluscan.inference.batching import batched_results, ordered_map
from celluscan.models import load_model_dir
from celluscan.taxonomy import CLASSES, group_of
from test_inference_support import PREPROCESSING, cell_image, make_model_dir, random_cells, write_images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def images():
    return random_cells(7, 10)


def reference_logits(model_dir, imgs):
    """Logits computed without the predictor: preprocess, normalise by hand, fp32 forward."""
    model, info = load_model_dir(model_dir)
    size = info.preprocessing["image_size"]
    arr = np.stack([np.asarray(preprocess(im, size, "edge"), dtype=np.float32) / 255 for im in imgs])
    arr = (arr - np.array(PREPROCESSING["mean"])) / np.array(PREPROCESSING["std"])
    x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(x)


# ---- predictor ---------------------------------------------------------------------------------


def test_predictions_are_temperature_scaled_probabilities_in_canonical_order(model_dir, images):
    predictor = Predictor.from_model_dir(model_dir, precision="fp32", batch_size=4)
    preds = predictor.predict_images(images)
    expected = torch.softmax(reference_logits(model_dir, images).double() / PREPROCESSING["temperature"], -1)
    assert len(preds) == len(images)
    for pred, probs in zip(preds, expected):
        assert list(pred.probs) == list(CLASSES)
        values = np.array(list(pred.probs.values()))
        assert values.min() >= 0 and abs(values.sum() - 1) < 1e-6
        np.testing.assert_allclose(values, probs.numpy(), atol=1e-5)
        assert pred.label == CLASSES[int(probs.argmax())]
        assert pred.confidence == pytest.approx(float(probs.max()), abs=1e-5)
        assert pred.group == group_of(pred.label) and pred.group_name
        assert len(pred.top_k) == 3 and pred.top_k[0] == (pred.label, pred.confidence)
        assert [p for _, p in pred.top_k] == sorted((p for _, p in pred.top_k), reverse=True)
        json.dumps(pred.to_dict())  # serialisable for the REST API


def test_every_torch_path_agrees_with_fp32_eager_on_top1(model_dir, images):
    model, info = load_model_dir(model_dir)
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    x = predictor.to_batch([predictor.prepare(im) for im in images])
    reference = TorchRunner(model, TORCH_PATHS[0])(x)[0]
    for path in TORCH_PATHS[1:] + JIT_PATHS:
        runner = TorchRunner(model, path)
        assert runner.path == path and runner.note == ""  # tracing worked, no eager fallback
        logits, features = runner(x)
        assert logits.dtype == torch.float32 and features.shape == (len(images), 32)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1)), path.name
        tolerance = 1e-4 if path.precision == "fp32" else 0.15 * float(reference.abs().max())
        assert float((logits - reference).abs().max()) < tolerance, path.name


def test_bf16_runner_is_mixed_precision_and_leaves_the_callers_model_alone(model_dir, images):
    model, _ = load_model_dir(model_dir)
    runner = TorchRunner(model, ExecutionPath.parse("bf16-explicit"))
    assert isinstance(runner.model.patch_embed, Float32) and not isinstance(model.patch_embed, Float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = Predictor.from_model_dir(model_dir, precision="fp32").to_batch(
        [np.asarray(preprocess(im, 32, "edge")) for im in images])
    reference = TorchRunner(model, ExecutionPath.parse("fp32-eager"))(x)[0]
    logits = runner(x)[0]
    diff = float((logits - reference).abs().max())
    assert 0 < diff < 0.05 * float(reference.abs().max())  # bf16 matmuls really ran, and closely
    heat = Predictor(runner, Predictor.from_model_dir(model_dir).spec).explain(images[0])
    assert heat.shape == images[0].size[::-1]  # attention maps from the bf16 runner's model


def test_bf16_predictor_matches_fp32_top1(model_dir, images):
    fp32 = Predictor.from_model_dir(model_dir, precision="fp32").predict_images(images)
    bf16_predictor = Predictor.from_model_dir(model_dir, precision="bf16")
    assert bf16_predictor.path_name.startswith("bf16-")
    bf16 = bf16_predictor.predict_images(images)
    assert [p.label for p in bf16] == [p.label for p in fp32]
    for a, b in zip(fp32, bf16):
        assert abs(a.confidence - b.confidence) < 0.05


def test_jit_predictor_pads_partial_batches_and_matches_eager(model_dir, images):
    eager = Predictor.from_model_dir(model_dir, precision="fp32", batch_size=4).predict_images(images)
    predictor = Predictor.from_model_dir(model_dir, precision="fp32", batch_size=4, jit=True)
    assert predictor.path_name.endswith("-jit")
    jitted = predictor.predict_images(images)  # 10 images: batches of 4, 4 and 2
    assert len(jitted) == len(images)
    assert [p.label for p in jitted] == [p.label for p in eager]
    np.testing.assert_allclose([p.confidence for p in jitted], [p.confidence for p in eager], atol=1e-5)
    logits, _ = predictor.run(predictor.to_batch([predictor.prepare(im) for im in images[:3]]))
    assert logits.shape == (3, len(CLASSES))  # padded to 4 inside, cut back to 3


def test_auto_precision_uses_bf16_only_where_native(model_dir):
    predictor = Predictor.from_model_dir(model_dir)
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert predictor.path_name.startswith(expected), (predictor.path_name, predictor.note)
    assert torch.get_num_threads() >= 1


def test_predict_paths_keeps_order_and_reports_bad_files(model_dir, tmp_path):
    good = write_images(tmp_path / "imgs", 7)
    corrupt = tmp_path / "imgs" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    missing = tmp_path / "imgs" / "missing.png"
    paths = [good[0], corrupt, *good[1:4], missing, *good[4:]]
    expected = Predictor.from_model_dir(model_dir, precision="fp32").predict_images(
        [Image.open(p).convert("RGB") for p in good])
    for workers in (0, 2):
        predictor = Predictor.from_model_dir(model_dir, precision="fp32", batch_size=3, workers=workers)
        results = list(predictor.predict_paths(paths))
        assert [p for p, _ in results] == paths
        assert isinstance(results[1][1], ImageLoadError) and str(corrupt) in str(results[1][1])
        assert isinstance(results[5][1], ImageLoadError) and "not found" in results[5][1].reason
        got = [r for _, r in results if not isinstance(r, ImageLoadError)]
        assert [g.label for g in got] == [e.label for e in expected]
        np.testing.assert_allclose([g.confidence for g in got], [e.confidence for e in expected], atol=1e-6)


def test_missing_default_model_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(predictor_module, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelNotFoundError, match="--model"):
        Predictor.from_model_dir(None)
    with pytest.raises(ModelNotFoundError, match="not found"):
        Predictor.from_model_dir(tmp_path / "nope")


def test_onnx_backend_without_export_says_how_to_make_one(model_dir):
    with pytest.raises(ModelNotFoundError, match="celluscan export"):
        Predictor.from_model_dir(model_dir, backend="onnx")


# ---- uncertainty -------------------------------------------------------------------------------


def vector(**probs):
    rest = (1 - sum(probs.values())) / (len(CLASSES) - len(probs))
    return [probs.get(c, rest) for c in CLASSES]


def test_confident_prediction_is_not_uncertain():
    verdict = assess_uncertainty(vector(lymphocyte=0.9), CLASSES)
    assert not verdict.uncertain and verdict.reason == "" and verdict.group_answer == ""


def test_low_confidence_is_uncertain():
    verdict = assess_uncertainty(vector(lymphocyte=0.5, platelet=0.1), CLASSES)
    assert verdict.uncertain and verdict.reason == "low confidence"
    assert not assess_uncertainty(vector(lymphocyte=0.5), CLASSES, UncertaintyPolicy(threshold=0.4)).uncertain


def test_adjacent_top_classes_give_the_group_answer():
    verdict = assess_uncertainty(vector(myelocyte=0.65, metamyelocyte=0.3), CLASSES)
    assert verdict.uncertain
    assert verdict.reason == "top classes are biologically adjacent (myelocyte vs metamyelocyte)"
    assert verdict.group_answer == "Granulocytic precursor: myelocyte or metamyelocyte — review recommended"
    # the boundary is inclusive: a runner-up with exactly 0.2 counts
    assert assess_uncertainty(vector(myelocyte=0.75, metamyelocyte=0.2), CLASSES).uncertain


def test_adjacency_needs_both_an_adjacent_runner_up_and_enough_probability():
    assert not assess_uncertainty(vector(myelocyte=0.65, lymphocyte=0.3), CLASSES).uncertain
    assert not assess_uncertainty(vector(myelocyte=0.8, metamyelocyte=0.15), CLASSES).uncertain


def test_cross_group_adjacency_names_both_groups_and_reasons_combine():
    verdict = assess_uncertainty(vector(eosinophil=0.5, neutrophil=0.4), CLASSES)
    assert verdict.reason == "low confidence; top classes are biologically adjacent (eosinophil vs neutrophil)"
    assert verdict.group_answer.startswith("Eosinophil / Mature neutrophil: eosinophil or neutrophil")


def test_low_confidence_inside_a_confident_group_offers_the_group():
    verdict = assess_uncertainty(vector(myelocyte=0.4, promyelocyte=0.15, metamyelocyte=0.15), CLASSES)
    assert verdict.reason == "low confidence"
    # 0.4 + 0.15 + 0.15 + immature_granulocyte's share of the rest (0.3 / 11) = 0.727
    assert verdict.group_answer.startswith("Granulocytic precursor (group probability 0.73)")


# ---- unfamiliar-image scores -------------------------------------------------------------------


def test_mahalanobis_full_and_compact_forms_agree():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    cov = a @ a.T + 0.5 * torch.eye(6)
    mean = torch.randn(6, generator=g)
    x = torch.randn(5, 6, generator=g)
    full = mahalanobis_score(x, mean, torch.linalg.inv(cov))
    z = x - mean
    expected = torch.einsum("bi,ij,bj->b", z, torch.linalg.inv(cov), z)
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
    variances, vectors = torch.linalg.eigh(cov)
    compact = mahalanobis_score(x, mean, components=vectors.T, variances=variances)
    torch.testing.assert_close(compact, full, rtol=1e-4, atol=1e-4)
    # top-3 components + isotropic residual: residual term is the leftover squared norm / variance
    top = mahalanobis_score(x, mean, components=vectors.T[3:], variances=variances[3:], residual_variance=2.0)
    proj = z @ vectors[:, 3:]
    manual = (proj.square() / variances[3:]).sum(-1) + (z.square().sum(-1) - proj.square().sum(-1)) / 2.0
    torch.testing.assert_close(top, manual, rtol=1e-4, atol=1e-4)


def test_class_conditional_mahalanobis_uses_the_nearest_mean():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[9.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(mahalanobis_score(x, means, torch.eye(2)), torch.tensor([1.0, 2.0]))


def test_energy_score():
    logits = torch.tensor([[2.0, 0.0, -1.0], [10.0, 10.0, 10.0]])
    torch.testing.assert_close(energy_score(logits, 2.0), -2.0 * torch.logsumexp(logits / 2.0, -1))
    assert energy_score(logits)[1] < energy_score(logits)[0]  # confident logits: lower energy


def test_ood_config_errors_are_clear():
    with pytest.raises(ValueError, match="mean"):
        OODScorer.from_config({"method": "mahalanobis", "precision": [[1.0]]})
    with pytest.raises(ValueError, match="unknown OOD method"):
        OODScorer.from_config({"method": "vibes"})
    scorer = OODScorer.from_config(None)
    assert scorer.flags(torch.tensor([1e9])) == [False] and "no OOD statistics" in scorer.note


def test_predictor_flags_unfamiliar_images_from_config_statistics(tmp_path, images):
    model_dir = make_model_dir(tmp_path / "m")
    model, _ = load_model_dir(model_dir)
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    x = predictor.to_batch([predictor.prepare(im) for im in images[:4]])
    with torch.no_grad():
        feats = model.forward_features(x)
    distances = (feats[1:] - feats[0]).square().sum(-1)
    threshold = float(distances.min()) / 2
    config = json.loads((model_dir / "config.json").read_text())
    config["ood"] = {"method": "mahalanobis", "mean": feats[0].tolist(),
                     "precision": torch.eye(feats.shape[1]).tolist(), "threshold": threshold}
    (model_dir / "config.json").write_text(json.dumps(config))
    preds = Predictor.from_model_dir(model_dir, precision="fp32").predict_images(images[:4])
    assert [p.unfamiliar for p in preds] == [False, True, True, True]
    assert preds[0].unfamiliar_score < threshold < min(p.unfamiliar_score for p in preds[1:])
    assert preds[1].unfamiliar_score == pytest.approx(float(distances[0]), rel=1e-3)
    assert preds[0].unfamiliar_note == ""


# ---- attention rollout -------------------------------------------------------------------------


def test_rollout_of_uniform_and_identity_attention():
    T = 5
    uniform = [torch.full((2, 3, T, T), 1.0 / T)] * 3
    rel = attention_rollout(uniform)
    assert rel.shape == (2, T - 1)
    torch.testing.assert_close(rel, rel[:, :1].expand_as(rel))  # every patch equally important
    assert float(rel.sum(-1).max()) <= 1 + 1e-6 and float(rel.min()) > 0
    identity = [torch.eye(T).expand(1, 2, T, T)] * 2
    assert float(attention_rollout(identity).abs().max()) == 0.0  # [CLS] attended only itself


def test_rollout_follows_where_cls_attends():
    T = 5
    a = torch.zeros(1, 1, T, T)
    a[0, 0, :, :] = torch.eye(T)
    a[0, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])  # [CLS] looks at patch 3 (token index 3)
    rel = attention_rollout([a])
    assert int(rel.argmax()) == 2 and float(rel[0, 2]) == pytest.approx(0.5)


def test_explain_heatmap_covers_the_original_image(model_dir, images):
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    img = cell_image(np.random.default_rng(3), width=61, height=37)
    heat = predictor.explain(img)
    assert heat.shape == (37, 61) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    overlay = overlay_heatmap(img, heat)
    assert overlay.size == img.size and overlay.mode == "RGB"
    assert np.abs(np.asarray(overlay, np.int16) - np.asarray(img, np.int16)).max() > 0


# ---- the loading pipeline ----------------------------------------------------------------------


def test_ordered_map_keeps_order_bounds_the_window_and_passes_errors():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(random.uniform(0, 0.01))
        with lock:
            in_flight -= 1
        if i % 7 == 3:
            raise ValueError(f"bad {i}")
        return i * i

    out = list(ordered_map(work, range(40), workers=3, window=5))
    assert [i for i, _ in out] == list(range(40))
    for i, r in out:
        assert (isinstance(r, ValueError) and str(r) == f"bad {i}") if i % 7 == 3 else r == i * i
    assert peak <= 3


def test_batched_results_runs_full_batches_and_keeps_errors_in_place():
    calls = []

    def run(batch):
        calls.append(list(batch))
        return [b * 10 for b in batch]

    loaded = [(0, 0), (1, ValueError("x")), (2, 2), (3, 3), (4, 4), (5, ValueError("y"))]
    out = list(batched_results(iter(loaded), 2, run))
    assert [i for i, _ in out] == list(range(6))
    assert [r for _, r in out if not isinstance(r, Exception)] == [0, 20, 30, 40]
    assert calls == [[0, 2], [3, 4]]
