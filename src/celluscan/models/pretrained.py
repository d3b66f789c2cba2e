"""Load pretrained weights from a local file into a model (never downloads anything).

Accepted files:

* a torchvision ``.pth``/``.pt`` state dict (e.g. ``vit_b_16-c867db91.pth``), read with
  ``torch.load(..., weights_only=True)``: a file that needs arbitrary Python objects to
  unpickle is refused, so a malicious pickle never runs;
* a ``.safetensors`` file in either our layout or torchvision's (detected from the keys);
* a model directory (its ``model.safetensors``).

Adaptations, each reported in a log line and in the returned ``PretrainedLoadReport``:
a head whose class count differs (1000 ImageNet classes vs our 14) is dropped and the
model keeps its fresh head; position embeddings for another image size are resized
(bicubic over the 2-D grid, [CLS] kept). Anything else that does not fit is an error.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from celluscan.models.convert import StateDictLayoutError, detect_layout, from_torchvision_state_dict
from celluscan.models.vit import resize_pos_embed

__all__ = ["load_pretrained", "read_weights_file", "PretrainedWeightsError", "PretrainedLoadReport",
           "TORCHVISION_WEIGHT_NAMES"]

log = logging.getLogger(__name__)

TORCHVISION_WEIGHT_NAMES = ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_SWAG_E2E_V1", "IMAGENET1K_SWAG_LINEAR_V1")
_TORCHVISION_FILE = "vit_b_16-c867db91.pth"
_TORCHVISION_URL = f"https://download.pytorch.org/models/{_TORCHVISION_FILE}"
_HEAD_KEYS = ("head.weight", "head.bias")


class PretrainedWeightsError(ValueError):
    """Pretrained weights could not be used; the message says why and what to do."""


@dataclass
class PretrainedLoadReport:
    source: Path
    layout: str  # "ours" or "torchvision"
    num_tensors: int
    head_dropped: bool = False
    pos_embed_resized: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    messages: list[str] = field(default_factory=list)


def _no_download_error(name: str) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"torchvision weights {name!r} cannot be fetched: CelluScan never downloads anything "
        f"(it runs offline). Download {_TORCHVISION_FILE} on a machine with network access "
        f"({_TORCHVISION_URL}), copy it here and pass its path instead, e.g. "
        f"--pretrained /path/to/{_TORCHVISION_FILE} (a .safetensors file also works)."
    )


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one nested under 'model'/'state_dict'; strip 'module.'."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise PretrainedWeightsError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainedWeightsError(f"{path}: entries that are not tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, a weights-only .pth/.pt, or a model directory."""
    text = os.fspath(path)
    if text in TORCHVISION_WEIGHT_NAMES or text.startswith("ViT_B_16_Weights"):
        raise _no_download_error(text)
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PretrainedWeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # keep torch's one-line reason (e.g. "... unsupported GLOBAL posix.system ..."), not its
        # advice to retry with weights_only=False, which is exactly what must not be done
        reasons = [line.strip() for line in str(exc).splitlines()
                   if "unsupported" in line.lower() and not line.startswith("Please")]
        raise PretrainedWeightsError(
            f"{path}: refused: the file needs arbitrary Python objects to load, which could run "
            f"code; only plain tensor state dicts are accepted (torch.load weights_only=True)"
            + (f". Detail: {reasons[0]}" if reasons else "")) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise PretrainedWeightsError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    return _unwrap(obj, path)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> PretrainedLoadReport:
    """Load local pretrained weights into ``model`` (ours or the torchvision wrapper).

    Raises ``PretrainedWeightsError`` for a torchvision weights *name* (no downloads), an
    unreadable/unsafe file, or weights that do not fit the architecture.
    """
    state = read_weights_file(path)
    source = Path(path)
    try:
        layout = detect_layout(state)
        if layout == "torchvision":
            state = from_torchvision_state_dict(state)
    except StateDictLayoutError as exc:
        raise PretrainedWeightsError(f"{source}: {exc}") from exc
    report = PretrainedLoadReport(source=source, layout=layout, num_tensors=len(state))
    target = model.canonical_state_dict()

    def note(message: str) -> None:
        log.warning("%s", message)
        report.messages.append(message)

    if "head.weight" in state and state["head.weight"].shape != target["head.weight"].shape:
        note(f"pretrained head has {state['head.weight'].shape[0]} classes, the model has "
             f"{target['head.weight'].shape[0]}: dropping the pretrained head (the model keeps its "
             f"freshly initialised head)")
        for key in _HEAD_KEYS:
            state.pop(key, None)
        report.head_dropped = True
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        old, new = tuple(state["pos_embed"].shape), tuple(target["pos_embed"].shape)
        grid = model.config.grid_size
        try:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], (grid, grid))
        except ValueError as exc:
            raise PretrainedWeightsError(f"{source}: {exc}") from exc
        note(f"position embeddings resized {old} -> {new} (bicubic over the patch grid)")
        report.pos_embed_resized = (old, new)

    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if set(missing) <= set(_HEAD_KEYS) and missing and not report.head_dropped:
        note("the weights file has no classification head: the model keeps its fresh head")
        report.head_dropped = True
    missing = [k for k in missing if k not in _HEAD_KEYS]
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                   for k in set(state) & set(target) if state[k].shape != target[k].shape]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            details.append(f"shape mismatch {sorted(wrong_shape)[:5]}")
        raise PretrainedWeightsError(
            f"{source}: weights do not fit model {model.config.name!r} "
            f"(conv_stem={model.config.conv_stem}): " + "; ".join(details))
    merged = {**target, **state}  # a dropped head keeps the model's own tensors
    model.load_canonical_state_dict(merged, strict=True)
    log.info("loaded %d pretrained tensors (%s layout) from %s", len(state), layout, source)
    return report
