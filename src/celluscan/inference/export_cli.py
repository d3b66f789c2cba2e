"""`celluscan export`: export a model directory to ONNX.

    celluscan export --format onnx MODEL_DIR OUT.onnx [--int8] [--check-images DIR]

The graph has a dynamic batch axis and carries the class names and preprocessing as ONNX
metadata, so ``celluscan predict --model OUT.onnx`` (or ``--backend onnx`` with
``MODEL_DIR/model.onnx``) runs it through ONNX Runtime. Export verifies the graph against
PyTorch fp32 (max logit difference <= 1e-3) and, with ``--int8``, reports the quantised
graph's top-1 agreement with fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "export a model directory to ONNX"

MAX_CHECK_IMAGES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (config.json + model.safetensors)")
    parser.add_argument("out", metavar="OUT.onnx", help="where to write the ONNX graph (atomically)")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    parser.add_argument("--int8", action="store_true",
                        help="write an int8 dynamically quantised graph (weights int8, activations "
                             "quantised on the fly) and report its top-1 agreement with fp32")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    parser.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                        help="torch.onnx exporter: torchscript (tracing), dynamo (needs onnxscript), "
                             "auto (dynamo when onnxscript is installed, default)")
    parser.add_argument("--check-images", metavar="DIR", default=None,
                        help=f"folder of images to verify the graph on (up to {MAX_CHECK_IMAGES}; "
                             "default: synthetic images)")


def run(args: argparse.Namespace) -> int:
    from celluscan.inference.cli import collect_inputs
    from celluscan.inference.export import ExportError, export_onnx

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        print(f"celluscan export: error: {out}: the output file name must end in .onnx", file=sys.stderr)
        return 1
    check = collect_inputs([args.check_images])[:MAX_CHECK_IMAGES] if args.check_images else []
    if args.check_images and not check:
        print(f"celluscan export: error: no images found in {args.check_images}", file=sys.stderr)
        return 1
    try:
        report = export_onnx(args.model_dir, out, int8=args.int8, opset=args.opset, check_images=check,
                             exporter=args.exporter)
    except (ExportError, OSError, ValueError, RuntimeError) as e:
        print(f"celluscan export: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
