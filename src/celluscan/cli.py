"""`celluscan <command>`: one dispatcher; each command lives in its own package's ``cli`` module.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Only the chosen command's module is imported, so ``celluscan --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from celluscan import __version__

COMMANDS: dict[str, str] = {
    "ingest": "celluscan.data.cli",
    "models": "celluscan.models.cli",
    "train": "celluscan.training.cli",
    "evaluate": "celluscan.evaluation.cli",
    "robustness": "celluscan.evaluation.robustness_cli",
    "predict": "celluscan.inference.cli",
    "export": "celluscan.inference.export_cli",
    "serve": "celluscan.serving.cli",
}

SUMMARIES: dict[str, str] = {
    "ingest": "scan image folders, map labels, verify, de-duplicate, split, write a dataset",
    "models": "list the model registry (parameters, GFLOPs) or summarise one model",
    "train": "train a model from a YAML config (resumable)",
    "evaluate": "evaluate a model on a folder-per-class tree or a manifest",
    "robustness": "measure robustness to other labs and synthetic shifts",
    "predict": "classify image files and folders (the main job)",
    "export": "export a model directory to ONNX",
    "serve": "start the web app and REST API (loopback by default)",
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"usage: celluscan <command> [options]   (celluscan {__version__})", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {SUMMARIES[c]}" for c in COMMANDS]
    lines += ["", "Run `celluscan <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"celluscan {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"celluscan: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 1
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"celluscan {name}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
