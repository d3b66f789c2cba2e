"""ONNX export: logits match PyTorch, dynamic batch, metadata, the ONNX backend, int8, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from celluscan.cli import main
from celluscan.inference import Predictor
from celluscan.inference.export import activation_matmuls, export_onnx, read_onnx_metadata
from celluscan.models import load_model_dir
from celluscan.taxonomy import CLASSES
from test_inference_support import PREPROCESSING, make_model_dir, write_images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = make_model_dir(root / "model")
    images = write_images(root / "imgs", 6, seed=5)
    report = export_onnx(model_dir, model_dir / "model.onnx", check_images=images)
    return model_dir, images, report


def torch_logits(model_dir, x):
    model, _ = load_model_dir(model_dir)
    with torch.no_grad():
        return model(x)


def test_onnx_logits_match_pytorch_fp32_with_a_dynamic_batch(exported):
    model_dir, images, report = exported
    assert report.max_abs_diff <= 1e-3 and report.check_source == "real" and report.check_images == 6
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        logits, features = session.run(None, {"images": x.numpy()})
        assert logits.shape == (batch, len(CLASSES)) and features.shape == (batch, 32)
        np.testing.assert_allclose(logits, torch_logits(model_dir, x).numpy(), atol=1e-3)


def test_metadata_travels_inside_the_graph(exported):
    model_dir, _, _ = exported
    props = {p.key: p.value for p in onnx.load(str(model_dir / "model.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == list(CLASSES)
    prep = json.loads(props["preprocessing"])
    assert prep["mean"] == PREPROCESSING["mean"] and prep["temperature"] == PREPROCESSING["temperature"]
    meta = read_onnx_metadata(model_dir / "model.onnx")
    assert meta["class_names"] == list(CLASSES) and meta["int8"] is False


def test_onnx_backend_predicts_like_pytorch(exported, tmp_path):
    model_dir, images, _ = exported
    imgs = [Image.open(p).convert("RGB") for p in images]
    reference = Predictor.from_model_dir(model_dir, backend="torch", precision="fp32").predict_images(imgs)
    onnx_predictor = Predictor.from_model_dir(model_dir, backend="onnx")
    assert onnx_predictor.path_name == "onnx-fp32"
    got = onnx_predictor.predict_images(imgs)
    assert [g.label for g in got] == [r.label for r in reference]
    for g, r in zip(got, reference):
        np.testing.assert_allclose(list(g.probs.values()), list(r.probs.values()), atol=1e-4)
    # naming the .onnx file itself selects ONNX Runtime even inside a model directory
    assert Predictor.from_model_dir(model_dir / "model.onnx").path_name == "onnx-fp32"
    # a lone .onnx file (no config.json beside it) carries its own metadata
    lone = tmp_path / "lone.onnx"
    lone.write_bytes((model_dir / "model.onnx").read_bytes())
    alone = Predictor.from_model_dir(lone).predict_images(imgs)
    assert [a.label for a in alone] == [r.label for r in reference]


def test_int8_export_reports_agreement_and_runs(exported, tmp_path):
    model_dir, images, _ = exported
    out = tmp_path / "int8.onnx"
    report = export_onnx(model_dir, out, int8=True, check_images=images)
    assert report.int8 and 0.0 <= report.int8_top1_agreement <= 1.0
    assert report.int8_max_abs_diff is not None and "agreement" in report.summary()
    graph = onnx.load(str(out))
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.graph.node)
    # weight MatMuls are quantised; attention's QK^T / AV stay fp32 MatMuls, convolutions fp32
    plain = [n for n in graph.graph.node if n.op_type == "MatMul"]
    assert plain and all(n.name in activation_matmuls(graph) for n in plain)
    assert not any(n.op_type == "ConvInteger" for n in graph.graph.node)
    predictor = Predictor.from_model_dir(out)
    assert predictor.path_name == "onnx-int8"
    assert len(predictor.predict_images([Image.open(images[0])])) == 1


def test_export_and_predict_commands(exported, tmp_path, capsys):
    model_dir, images, _ = exported
    out = tmp_path / "cli.onnx"
    assert main(["export", "--format", "onnx", str(model_dir), str(out)]) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    csv_path = tmp_path / "preds.csv"
    assert main(["predict", str(images[0].parent), "--model", str(out), "--backend", "onnx",
                 "-o", str(csv_path), "--quiet"]) == 0
    assert len(csv_path.read_text().splitlines()) == 1 + len(images)
    assert main(["export", str(model_dir), str(tmp_path / "wrong.txt")]) == 1
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 1
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_each_exporter_writes_a_graph_that_matches_pytorch(exporter, tmp_path):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    model_dir = make_model_dir(tmp_path / "model")
    report = export_onnx(model_dir, tmp_path / "m.onnx", exporter=exporter)
    assert report.exporter == exporter and report.max_abs_diff <= 1e-3
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch axis is dynamic whichever exporter wrote it
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        logits, _ = session.run(None, {"images": x.numpy()})
        np.testing.assert_allclose(logits, torch_logits(model_dir, x).numpy(), atol=1e-3)


def test_an_unknown_or_unavailable_exporter_is_a_clear_error(tmp_path, monkeypatch):
    model_dir = make_model_dir(tmp_path / "model")
    with pytest.raises(ValueError, match="unknown ONNX exporter 'jit'"):
        export_onnx(model_dir, tmp_path / "m.onnx", exporter="jit")
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    with pytest.raises(ValueError, match="needs the onnxscript package"):
        export_onnx(model_dir, tmp_path / "m.onnx", exporter="dynamo")
    assert export_onnx(model_dir, tmp_path / "m.onnx").exporter == "torchscript"  # auto falls back
