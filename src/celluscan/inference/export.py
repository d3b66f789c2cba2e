"""Export a model directory to ONNX (optionally int8-quantised) and read the metadata back.

The graph takes ``images`` (B, 3, S, S), normalised, with a dynamic batch axis, and returns
``logits`` (B, C) and ``features`` (B, D) (the [CLS] features, for the unfamiliar score).
Everything the predictor needs travels inside the file as ``metadata_props``:

* ``celluscan_config``: the model directory's whole ``config.json`` (class names,
  preprocessing, OOD statistics, training metadata);
* ``class_names`` and ``preprocessing``: the same, as their own JSON entries for other tools;
* ``int8``: "1" when the weights were dynamically quantised to int8.

Export checks itself: the ONNX Runtime logits must match PyTorch fp32 within ``atol``
(fp32 graph), and the int8 graph's top-1 agreement with fp32 is measured and reported.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from celluscan.data.atomic import atomic_write_bytes
from celluscan.inference.backends import LogitsAndFeatures, synthetic_batch

__all__ = ["EXPORTERS", "ExportReport", "ExportError", "export_onnx", "read_onnx_metadata", "OPSET"]

OPSET = 17


class ExportError(RuntimeError):
    """Export failed or the exported graph does not reproduce the PyTorch model."""


@dataclass
class ExportReport:
    path: Path
    opset: int
    exporter: str
    max_abs_diff: float  # fp32 graph vs PyTorch fp32 logits on the check batch
    check_images: int
    check_source: str
    int8: bool = False
    int8_top1_agreement: float | None = None  # int8 graph vs PyTorch fp32, on the check batch
    int8_max_abs_diff: float | None = None
    size_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, opset {self.opset}, {self.exporter} exporter)",
            f"fp32 graph vs PyTorch fp32: max |logit diff| {self.max_abs_diff:.2e} "
            f"on {self.check_images} {self.check_source} images",
        ]
        if self.int8:
            lines.append(f"int8 (dynamic quantisation): top-1 agreement with fp32 "
                         f"{100 * (self.int8_top1_agreement or 0):.1f}%, max |logit diff| "
                         f"{self.int8_max_abs_diff:.3f} on {self.check_images} {self.check_source} images")
        lines += self.notes
        return "\n".join(lines)



INT8_QUANTISATION = {"op_types_to_quantize": ["MatMul"], "per_channel": True}
"""Dynamic int8 settings: the transformer's weight MatMuls only (qkv, projection, MLP), weights
per output channel; the patch embedding / conv stem, the head and the attention products
(QK^T, AV: :func:`activation_matmuls`) stay fp32. Measured on the shipped model (top-1 agreement
with fp32 on real images): onnxruntime's default (MatMul, Gemm and Conv, per-tensor weights)
97.5% on 400 blood-cells-extra images; per-channel alone 97.75%; these settings 100% and 99.8%
on 500 images each of blood-cells and blood-cells-extra, and ViT-B/16 ran faster with the
attention products left in fp32 (BENCHMARKS.md "Inference")."""


def activation_matmuls(proto) -> list[str]:
    """Names of the MatMul nodes with no constant (weight) input: attention's QK^T and AV."""
    constants = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and not any(i in constants for i in n.input)]

EXPORTERS = ("auto", "torchscript", "dynamo")
"""``torchscript``: torch.onnx's tracing exporter (no extra package; ~4 s for the shipped model);
``dynamo``: the torch.export-based one (needs ``onnxscript``; ~13 s; no Shape/Gather chains for
the dynamic batch). Both graphs ran at the same speed in ONNX Runtime (shipped model, int8,
batches 1, 8 and 32, interleaved in one process). ``auto``: dynamo when onnxscript is installed."""


def resolve_exporter(exporter: str) -> str:
    """``auto`` -> the exporter that will run; an unknown name or a missing onnxscript is a
    ValueError that says what to do."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    try:
        import onnxscript  # noqa: F401

        have_onnxscript = True
    except ImportError:
        have_onnxscript = False
    if exporter == "auto":
        return "dynamo" if have_onnxscript else "torchscript"
    if exporter == "dynamo" and not have_onnxscript:
        raise ValueError("the dynamo exporter needs the onnxscript package (pip install onnxscript); "
                         "or choose --exporter torchscript")
    return exporter


def _export_graph(model: nn.Module, image_size: int, out: Path, opset: int, exporter: str) -> None:
    """torch.onnx.export with a dynamic batch axis, by ``exporter`` (already resolved)."""
    wrapper = LogitsAndFeatures(model).eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    names = dict(input_names=["images"], output_names=["logits", "features"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            # dynamic_shapes follows forward's positional arguments, not the ONNX input names
            torch.onnx.export(wrapper, (dummy,), str(out), opset_version=opset, dynamo=True,
                              dynamic_shapes=({0: batch},), external_data=False, **names)
        else:
            axes = {"images": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}}
            torch.onnx.export(wrapper, (dummy,), str(out), opset_version=opset, dynamo=False,
                              dynamic_axes=axes, do_constant_folding=True, **names)


def _set_metadata(model_proto, entries: dict[str, str]) -> None:
    keep = [p for p in model_proto.metadata_props if p.key not in entries]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for key, value in entries.items():
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = key, value


def read_onnx_metadata(path: str | os.PathLike, required: bool = True) -> dict[str, Any]:
    """The celluscan metadata of an exported graph: the model directory's config document
    (``class_names``, ``preprocessing``, ``ood``, ``metadata``...) plus ``int8`` (bool).
    With ``required``, a graph without it raises ``ValueError`` naming the file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base class
        raise ValueError(f"{path}: not a readable ONNX file: {e}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "celluscan_config" not in props:
        if required:
            raise ValueError(f"{path}: no celluscan metadata in this ONNX file; export it with "
                             "`celluscan export` or put its model directory's config.json beside it")
        return {"int8": props.get("int8") == "1"}
    try:
        document = json.loads(props["celluscan_config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: garbled celluscan_config metadata: {e}") from None
    for key in ("class_names", "preprocessing"):
        if key not in document:
            raise ValueError(f"{path}: celluscan metadata lacks {key!r}")
    document["int8"] = props.get("int8") == "1"
    return document


def _check_batch(paths: Sequence[Path], preprocessing: dict, n_synthetic: int = 8
                 ) -> tuple[torch.Tensor, str]:
    """Normalised images to compare graphs on: the given files, else smooth synthetic ones."""
    from celluscan.data.batch_augment import EvalPreprocess
    from celluscan.data.imageio import ImageLoadError, load_image
    from celluscan.data.transforms import preprocess

    size = int(preprocessing["image_size"])
    arrays = []
    for p in paths:
        try:
            img = load_image(p)
        except ImageLoadError:
            continue
        arrays.append(np.asarray(preprocess(img, size, preprocessing.get("pad_fill", "edge"),
                                             preprocessing.get("canonical"))))
    if arrays:
        normalise = EvalPreprocess(size, preprocessing["mean"], preprocessing["std"])
        return normalise(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)), "real"
    return synthetic_batch(size, n_synthetic, seed=0), "synthetic"


def export_onnx(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    int8: bool = False,
    opset: int = OPSET,
    check_images: Sequence[str | os.PathLike] = (),
    atol: float = 1e-3,
    exporter: str = "auto",
) -> ExportReport:
    """Export ``model_dir`` to ``out_path`` (written atomically). With ``int8`` the written
    graph is the dynamically quantised one; the fp32 graph is still checked first."""
    import onnx

    from celluscan.inference.backends import OnnxRunner
    from celluscan.models import load_model_dir

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    exporter = resolve_exporter(exporter)  # a bad choice fails before the model is loaded
    model, info = load_model_dir(model_dir)
    model.set_fused_attn(False)  # plain MatMul/Softmax: exports cleanly everywhere
    out = Path(out_path)
    size = int(info.preprocessing["image_size"])
    x, source = _check_batch([Path(p) for p in check_images], info.preprocessing)
    with torch.inference_mode():
        reference = model.head(model.forward_features(x))
    with tempfile.TemporaryDirectory(prefix="celluscan-export-") as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        try:
            _export_graph(model, size, fp32_path, opset, exporter)
        except Exception as e:
            raise ExportError(f"{model_dir}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
        proto = onnx.load(str(fp32_path))
        onnx.checker.check_model(proto)
        entries = {
            "celluscan_config": json.dumps(info.config),
            "class_names": json.dumps(list(info.class_names)),
            "preprocessing": json.dumps(info.preprocessing),
            "int8": "0",
        }
        _set_metadata(proto, entries)
        onnx.save(proto, str(fp32_path))
        logits, _ = OnnxRunner(fp32_path)(x)
        max_diff = float((logits - reference).abs().max())
        if not max_diff <= atol:
            raise ExportError(f"{model_dir}: exported graph disagrees with PyTorch: max |logit diff| "
                              f"{max_diff:.2e} > {atol:.0e}")
        report = ExportReport(out, opset, exporter, max_diff, int(x.shape[0]), source)
        final = fp32_path
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q_path = Path(tmp) / "model.int8.onnx"
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # quiet onnxruntime's generic "consider pre-processing" advice
            try:
                quantize_dynamic(str(fp32_path), str(q_path), weight_type=QuantType.QInt8,
                                 nodes_to_exclude=activation_matmuls(proto), **INT8_QUANTISATION)
            finally:
                root.setLevel(level)
            q_proto = onnx.load(str(q_path))
            _set_metadata(q_proto, {**entries, "int8": "1"})
            onnx.save(q_proto, str(q_path))
            q_logits, _ = OnnxRunner(q_path, precision="int8")(x)
            report.int8 = True
            report.int8_top1_agreement = float((q_logits.argmax(-1) == reference.argmax(-1)).float().mean())
            report.int8_max_abs_diff = float((q_logits - reference).abs().max())
            final = q_path
        data = final.read_bytes()
    atomic_write_bytes(out, data)
    report.size_bytes = len(data)
    if source == "synthetic":
        report.notes.append("note: checked on synthetic images; pass --check-images DIR for real ones")
    return report
