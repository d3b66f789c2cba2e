"""The model directory: the one format a trained model is shipped in.

    MODEL_DIR/
      model.safetensors   weights in our layout (fp32 or bf16); never a pickle
      config.json         architecture, class names, preprocessing, training metadata

config.json::

    {
      "format": "celluscan-model", "format_version": 1,
      "architecture": {"name": "vit_s_16", "overrides": {"num_classes": 14, ...},
                       "config": {...every ViTConfig field...}},
      "class_names": ["band_neutrophil", ...],          # canonical order = logit order
      "id2label": {"0": "band_neutrophil", ...},
      "preprocessing": {"image_size": 224, "pad_fill": "edge", "mean": [r, g, b],
                        "std": [r, g, b], "temperature": 1.0},
      "metadata": {...training run, metrics...},
      "weights": {"file": "model.safetensors", "dtype": "float32", "sha256": "...",
                  "num_parameters": 21_000_000}
    }

Saving is atomic: everything is written into a temporary sibling directory, then renamed
into place; an existing model directory is replaced only after the new one is complete.
Loading checks every file and field and raises ``ModelDirError`` naming the file and the
problem; it never unpickles anything (safetensors + JSON only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from celluscan.models.registry import build_model, config_overrides
from celluscan.models.vit import ViTConfig

__all__ = [
    "ModelDirInfo",
    "ModelDirError",
    "save_model_dir",
    "load_model_dir",
    "read_model_dir_info",
    "update_model_dir",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
]

FORMAT = "celluscan-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSING_DEFAULTS = {"pad_fill": "edge", "temperature": 1.0}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelDirError(ValueError):
    """A model directory (or a file in it) is missing, garbled or inconsistent."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class ModelDirInfo:
    """What config.json says about a model directory (``config`` is the whole parsed file)."""

    path: Path
    config: dict[str, Any]
    class_names: tuple[str, ...]
    preprocessing: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_config(self) -> ViTConfig:
        return ViTConfig.from_dict(self.config["architecture"]["config"])

    @property
    def weights_dtype(self) -> str:
        return self.config["weights"]["dtype"]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_preprocessing(prep: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """Fill defaults and validate: image_size > 0, pad_fill str, 3-value mean/std (std > 0),
    temperature > 0."""
    out = {**PREPROCESSING_DEFAULTS, **dict(prep)}
    problems = []
    missing = [k for k in ("image_size", "mean", "std") if k not in out]
    if missing:
        raise ModelDirError(source, f"preprocessing is missing {missing}")
    size = out["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        problems.append(f"image_size must be a positive integer, got {size!r}")
    for key in ("mean", "std"):
        value = out[key]
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
            problems.append(f"{key} must be 3 finite numbers, got {value!r}")
        else:
            out[key] = [float(v) for v in value]
    if "std" not in " ".join(problems) and any(v <= 0 for v in out["std"]):
        problems.append(f"std must be positive, got {out['std']!r}")
    if not isinstance(out["pad_fill"], (str, int, list)):
        problems.append(f"pad_fill must be a string such as 'edge', got {out['pad_fill']!r}")
    temp = out["temperature"]
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not math.isfinite(temp) or temp <= 0:
        problems.append(f"temperature must be a positive number, got {temp!r}")
    else:
        out["temperature"] = float(temp)
    if out.get("canonical") is not None:
        from celluscan.data.canonical import CanonicalConfig

        try:
            out["canonical"] = CanonicalConfig.from_dict(out["canonical"]).to_dict()
        except (TypeError, ValueError) as e:
            problems.append(f"canonical: {e}")
    if problems:
        raise ModelDirError(source, "bad preprocessing: " + "; ".join(problems))
    return out


def _check_class_names(class_names: Sequence[str], num_classes: int, source: str | Path) -> tuple[str, ...]:
    names = tuple(class_names)
    if not all(isinstance(n, str) and n for n in names):
        raise ModelDirError(source, "class_names must be non-empty strings")
    if len(set(names)) != len(names):
        raise ModelDirError(source, f"class_names has duplicates: {list(names)}")
    if len(names) != num_classes:
        raise ModelDirError(source, f"{len(names)} class_names for a model with {num_classes} outputs")
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync (callers make it atomic by writing in a temp location first)."""
    text = json.dumps(data, indent=2, sort_keys=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_model_dir(
    model: nn.Module,
    path: str | os.PathLike,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` as a model directory at ``path`` (atomically). Returns the path.

    ``preprocessing`` needs ``mean`` and ``std``; ``image_size`` defaults to the model's,
    ``pad_fill`` to "edge", ``temperature`` to 1.0. ``dtype`` (float32 or bfloat16) is the
    storage precision of floating-point weights. ``metadata`` must be JSON-serialisable.
    An existing *model* directory at ``path`` is replaced; any other existing non-empty
    directory or file is refused.
    """
    from safetensors.torch import save_file

    path = Path(path)
    config: ViTConfig = model.config
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    names = _check_class_names(class_names, config.num_classes, path)
    prep = _check_preprocessing({"image_size": config.image_size, **dict(preprocessing)}, path)
    _check_replaceable(path)
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata for {path} is not JSON-serialisable: {exc}") from exc

    tensors = {
        key: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
        for key, t in model.canonical_state_dict().items()
    }
    dtype_name = str(dtype).removeprefix("torch.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weights_path = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights_path), metadata={"format": "pt", "layout": "celluscan"})
        with open(weights_path, "rb+") as f:
            os.fsync(f.fileno())
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": {
                "name": config.name,
                "overrides": config_overrides(config),
                "config": config.to_dict(),
            },
            "class_names": list(names),
            "id2label": {str(i): n for i, n in enumerate(names)},
            "preprocessing": prep,
            "metadata": dict(metadata or {}),
            "weights": {
                "file": WEIGHTS_FILE,
                "dtype": dtype_name,
                "sha256": _sha256(weights_path),
                "num_parameters": sum(p.numel() for p in model.parameters()),
            },
        }
        _write_json(tmp / CONFIG_FILE, document)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path) -> None:
    """Only an absent path, an empty directory or an existing model directory may be replaced."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ModelDirError(path, "exists and is not a directory; refusing to replace it")
    if any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise ModelDirError(path, f"exists, is not empty and has no {CONFIG_FILE}: "
                                  "not a model directory, refusing to replace it")


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` directory to ``path``, replacing an old one if present.

    The old directory is first renamed aside (``.NAME.old-*``) and deleted only after the
    new one is in place, so a crash never leaves a half-written model at ``path``.
    """
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the old model back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def read_model_dir_info(path: str | os.PathLike) -> ModelDirInfo:
    """Parse and validate config.json without loading weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(path, "not a directory (expected a model directory with "
                                  f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelDirError(config_path, "missing: not a model directory")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelDirError(config_path, f"not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelDirError(config_path, f"garbled JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(document, dict):
        raise ModelDirError(config_path, "expected a JSON object at the top level")
    if document.get("format") != FORMAT:
        raise ModelDirError(config_path, f"format is {document.get('format')!r}, expected {FORMAT!r}")
    if document.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(config_path, f"unsupported format_version {document.get('format_version')!r} "
                                         f"(this version reads {FORMAT_VERSION})")
    missing = [k for k in ("architecture", "class_names", "preprocessing", "weights") if k not in document]
    if missing:
        raise ModelDirError(config_path, f"missing field(s) {missing}")
    try:
        model_config = ViTConfig.from_dict(document["architecture"]["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(config_path, f"bad architecture config: {exc}") from exc
    weights = document["weights"]
    if not isinstance(weights, dict) or weights.get("dtype") not in _DTYPES:
        raise ModelDirError(config_path, f"bad weights entry {weights!r}")
    if weights.get("file", WEIGHTS_FILE) != WEIGHTS_FILE:
        # The weights are always model.safetensors inside the directory: a config naming
        # another file (a path such as ../../etc/passwd, or a pickle) is refused, not followed.
        raise ModelDirError(config_path, f"weights.file is {weights.get('file')!r}; only "
                                         f"{WEIGHTS_FILE!r} inside the model directory is accepted")
    if not isinstance(document["class_names"], list):
        raise ModelDirError(config_path, "class_names must be a list")
    names = _check_class_names(document["class_names"], model_config.num_classes, config_path)
    prep = _check_preprocessing(document["preprocessing"] if isinstance(document["preprocessing"], dict)
                                else {}, config_path)
    metadata = document.get("metadata") or {}
    return ModelDirInfo(path=path, config=document, class_names=names, preprocessing=prep,
                        metadata=metadata if isinstance(metadata, dict) else {"value": metadata})


def load_model_dir(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, ModelDirInfo]:
    """Build the model a directory describes and load its weights. Returns (model, info).

    The model is in eval mode with parameters in ``dtype`` (float32 by default, whatever
    precision the weights were stored in).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_model_dir_info(path)
    weights_path = info.path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelDirError(weights_path, "missing")
    expected_sha = info.config["weights"].get("sha256")
    if expected_sha and _sha256(weights_path) != expected_sha:
        raise ModelDirError(weights_path, "contents do not match the sha256 in config.json "
                                          "(corrupted or partially replaced)")
    try:
        tensors = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(weights_path, f"not a readable safetensors file ({exc})") from exc

    model = build_model(info.model_config)
    tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    try:
        model.load_canonical_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelDirError(weights_path, f"weights do not fit the architecture in {CONFIG_FILE}: {exc}") from exc
    model.to(device=map_location, dtype=dtype)
    model.eval()
    return model, info


def update_model_dir(
    path: str | os.PathLike,
    preprocessing: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ModelDirInfo:
    """Merge new preprocessing (e.g. a fitted ``temperature``) and/or metadata into config.json,
    atomically (temp file + os.replace). Returns the updated info."""
    info = read_model_dir_info(path)
    document = dict(info.config)
    if preprocessing:
        document["preprocessing"] = _check_preprocessing({**info.preprocessing, **dict(preprocessing)}, info.path)
    if metadata:
        document["metadata"] = {**info.metadata, **dict(metadata)}
    tmp = info.path / f".{CONFIG_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_json(tmp, document)
        os.replace(tmp, info.path / CONFIG_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return read_model_dir_info(info.path)
