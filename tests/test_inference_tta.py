"""Test-time augmentation (inference.tta): the views, the averaging, and how the predictor and
the CLIs expose it."""

from __future__ import annotations

import csv

import pytest
import torch

from celluscan.inference import Predictor
from celluscan.inference.backends import ExecutionPath, TorchRunner
from celluscan.inference.tta import TTA_MODES, TestTimeAugmentation, views, with_tta
from celluscan.models import load_model_dir
from test_inference_support import make_model_dir, random_cells, write_images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def images():
    return random_cells(11, 6)


def test_views_are_the_distinct_symmetries_of_the_square_starting_with_identity():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    for mode, count in (("none", 1), ("flip", 2), ("d8", 8)):
        outs = [v(x) for v in views(mode)]
        assert len(outs) == count
        assert torch.equal(outs[0], x)  # the image as it is comes first
        assert len({tuple(o.flatten().tolist()) for o in outs}) == count  # all different
        for o in outs:  # each view is a permutation of the same pixels
            assert sorted(o.flatten().tolist()) == sorted(x.flatten().tolist())
    assert torch.equal(views("flip")[1](x), x.flip(-1))
    with pytest.raises(ValueError, match="unknown test-time augmentation 'spin'"):
        views("spin")


class _Recorder:
    """A fake runner: logits are the mean pixel per row of the top-left corner, features the
    input's first pixel; records every batch it sees."""

    path = ExecutionPath("torch", "fp32")

    def __init__(self):
        self.seen = []

    def __call__(self, x):
        self.seen.append(x.clone())
        corner = x[:, 0, 0, 0]
        return torch.stack([corner, -corner], dim=1), x[:, :, 0, 0]


def test_logits_are_averaged_over_views_and_features_come_from_the_image_as_it_is():
    x = torch.randn(3, 3, 5, 5)
    inner = _Recorder()
    logits, features = TestTimeAugmentation(inner, "d8")(x)
    assert len(inner.seen) == 8
    corners = torch.stack([v(x)[:, 0, 0, 0] for v in views("d8")])  # (views, B)
    torch.testing.assert_close(logits[:, 0], corners.mean(0))
    # every corner of the square is the top-left pixel of exactly two of the eight views
    four = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]])
    torch.testing.assert_close(logits[:, 0], four.mean(0))
    torch.testing.assert_close(features, x[:, :, 0, 0])
    assert with_tta(inner, "none") is inner


def test_tta_is_invariant_to_the_symmetries_it_averages(model_dir, images):
    model, _ = load_model_dir(model_dir)
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    x = predictor.to_batch([predictor.prepare(im) for im in images])
    runner = TestTimeAugmentation(TorchRunner(model, ExecutionPath("torch", "fp32")), "d8")
    plain = TorchRunner(model, ExecutionPath("torch", "fp32"))(x)[0]
    averaged = runner(x)[0]
    turned = runner(torch.rot90(x, 1, dims=(-2, -1)).flip(-1))[0]
    torch.testing.assert_close(averaged, turned, atol=1e-4, rtol=1e-4)  # same set of views
    assert not torch.allclose(averaged, plain, atol=1e-4)  # and it did change the answer's logits


def test_predictor_with_tta_names_its_path_and_keeps_the_unfamiliar_features(model_dir, images):
    plain = Predictor.from_model_dir(model_dir, precision="fp32")
    flip = Predictor.from_model_dir(model_dir, precision="fp32", tta="flip")
    assert plain.tta == "none" and plain.path_name == plain.runner.path.name
    assert flip.tta == "flip" and flip.path_name == plain.path_name + "+tta-flip"
    x = plain.to_batch([plain.prepare(im) for im in images])
    base_logits, base_features = plain.run(x)
    logits, features = flip.run(x)
    mirrored, _ = plain.run(x.flip(-1))
    torch.testing.assert_close(logits, (base_logits + mirrored) / 2)
    torch.testing.assert_close(features, base_features)
    preds = flip.predict_images(images)
    assert [p.label for p in preds] == [flip.class_names[i] for i in logits.argmax(-1).tolist()]
    assert flip.explanation_model() is flip.runner.runner.model  # explanations still work
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        Predictor.from_model_dir(model_dir, tta="sideways")


def test_cli_choices_match_the_modes():
    import argparse

    from celluscan.evaluation import cli as evaluate_cli
    from celluscan.inference import cli as predict_cli
    from celluscan.serving import cli as serve_cli

    for module in (predict_cli, evaluate_cli, serve_cli):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        action = next(a for a in parser._actions if a.dest == "tta")
        assert tuple(action.choices) == tuple(TTA_MODES) and action.default == "none"


def test_predict_cli_with_tta_writes_the_averaged_prediction(model_dir, images, tmp_path):
    from celluscan.cli import main

    folder = tmp_path / "imgs"
    paths = write_images(folder, 6)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(folder), "--model", str(model_dir), "--tta", "d8", "--precision", "fp32",
                         "--output", str(out), "--quiet"]) == 0
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    expected = Predictor.from_model_dir(model_dir, precision="fp32", tta="d8")
    assert len(rows) == len(paths)
    for path, pred in expected.predict_paths(paths):
        assert rows[str(path)]["prediction"] == pred.label
        assert float(rows[str(path)]["confidence"]) == pytest.approx(pred.confidence, abs=1e-4)


def test_server_with_tta_says_so_in_its_model_info(model_dir, images):
    from celluscan.serving.service import ModelService

    plain = ModelService.from_model_dir(model_dir)
    flip = ModelService.from_model_dir(model_dir, tta="flip")
    assert flip.info.to_json()["execution_path"] == plain.info.to_json()["execution_path"] + "+tta-flip"
    assert flip.predictor.tta == "flip" and plain.predictor.tta == "none"

    from fastapi.testclient import TestClient

    from celluscan.serving.app import create_app

    with TestClient(create_app(flip, with_ui=False)) as client:
        assert client.get("/api/v1/health").json()["execution_path"].endswith("+tta-flip")
