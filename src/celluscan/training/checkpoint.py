"""Resumable checkpoints: tensors in safetensors, everything else in JSON, written atomically.

Layout::

    RUN/checkpoints/step-00000120/state.safetensors   model.*, ema.*, optim.* tensors
    RUN/checkpoints/step-00000120/state.json          epoch, step, RNG states, history, config...
    RUN/checkpoints/latest.json                       {"name": "step-00000120"}

A checkpoint is written into a hidden temporary directory (both files fsync'ed), renamed into
place with ``os.replace`` and only then published by rewriting ``latest.json`` (itself atomic).
A crash at any point leaves either the previous checkpoint or the new one; a directory is never
half-written. :func:`load_latest` trusts ``latest.json`` when it points at a complete directory
and otherwise falls back to the newest complete directory.

Nothing here is pickled: RNG states are JSON lists / base64 strings, optimizer hyper-parameters
JSON, optimizer moments safetensors.

Test hook: ``CELLUSCAN_CHECKPOINT_PAUSE=STAGE:N`` makes the N-th checkpoint write of this process
print ``CHECKPOINT-PAUSE STAGE`` on stdout and sleep at STAGE (``tensors``: temp dir holds only the
tensors; ``files``: both files written, not renamed; ``renamed``: in place, ``latest.json`` not
updated; ``published``: complete and published, old ones not yet pruned), so a test can
SIGKILL the writer exactly there.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from celluscan.data.atomic import atomic_write_text

__all__ = [
    "CHECKPOINT_FORMAT",
    "PAUSE_ENV",
    "save_checkpoint",
    "load_latest",
    "list_complete",
    "rng_state",
    "set_rng_state",
    "optimizer_tensors",
    "load_optimizer",
]

CHECKPOINT_FORMAT = "celluscan-checkpoint-v1"
PAUSE_ENV = "CELLUSCAN_CHECKPOINT_PAUSE"
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
POINTER_FILE = "latest.json"

_writes_done = 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _maybe_pause(stage: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    want_stage, _, nth = spec.partition(":")
    if want_stage == stage and _writes_done + 1 == int(nth or 1):
        print(f"CHECKPOINT-PAUSE {stage}", flush=True)
        time.sleep(3600)


def save_checkpoint(root: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint ``name`` under ``root`` atomically, publish it, prune old ones."""
    global _writes_done
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(tmp / TENSORS_FILE))
    _fsync_file(tmp / TENSORS_FILE)
    _maybe_pause("tensors")
    meta = {"format": CHECKPOINT_FORMAT, "name": name, **meta}
    (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    _fsync_file(tmp / META_FILE)
    _fsync_dir(tmp)
    _maybe_pause("files")
    if final.exists():  # same step saved again (e.g. after a resume): swap the old one out
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _maybe_pause("renamed")
    atomic_write_text(root / POINTER_FILE, json.dumps({"name": name}))
    _maybe_pause("published")
    _writes_done += 1
    for stale in list_complete(root)[:-keep_last]:
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_complete(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p / TENSORS_FILE).is_file() and (p / META_FILE).is_file()]
    return sorted(dirs, key=_step_of)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / META_FILE}: not a {CHECKPOINT_FORMAT} file")
    tensors = load_file(str(path / TENSORS_FILE))
    return tensors, meta


def load_latest(root: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path] | None:
    """The newest valid checkpoint under ``root`` as ``(tensors, meta, dir)``, or None.

    Leftover temporary directories from an interrupted write are removed.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    candidates: list[Path] = []
    try:
        pointed = json.loads((root / POINTER_FILE).read_text(encoding="utf-8"))["name"]
        candidates.append(root / pointed)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    candidates += [p for p in reversed(list_complete(root)) if p not in candidates]
    for path in candidates:
        try:
            tensors, meta = _read(path)
        except Exception as e:  # a damaged checkpoint: say so and fall back to an older one
            if path.exists():
                print(f"checkpoint {path} is unusable ({type(e).__name__}: {e}); trying an older one",
                      file=sys.stderr)
            continue
        return tensors, meta, path
    return None


# ------------------------------------------------------------------------------------------
# RNG and optimizer state as JSON + tensors (no pickle)
# ------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states as JSON-serialisable data."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where devices match)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON data."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], data: dict,
                   prefix: str = "optim.") -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, name = key[len(prefix):].split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in data.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = data["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
