"""The model behind the server: decode uploads, classify them in batches, explain one image.

:class:`ModelService` wraps an ``inference.Predictor``. It is shared by the REST API (which
calls :meth:`ModelService.run` from the event loop: the work runs in a worker thread, with
admission control and a time limit) and the web UI (which calls the sync methods from
Gradio's worker threads). One lock serialises model calls; CPU inference gains nothing from
running two forward passes at once.

Images are decoded only through :func:`celluscan.data.imageio.load_image_bytes`, lazily,
one batch at a time, so a 500-image request never holds 500 decoded images.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import anyio

from celluscan import __version__
from celluscan.data.imageio import ImageLoadError, load_image_bytes
from celluscan.serving.limits import ServingLimits
from celluscan.serving.uploads import Upload, UploadError
from celluscan.taxonomy import TAXONOMY

__all__ = [
    "FileResult",
    "ModelInfo",
    "ModelService",
    "FairLock",
    "ServiceBusy",
    "ServiceTimeout",
    "prediction_to_json",
]

log = logging.getLogger("celluscan.serving")
T = TypeVar("T")
ProgressFn = Callable[[int, int], None]


class ServiceBusy(RuntimeError):
    """Too many requests are already waiting for the model (answered 503)."""


class ServiceTimeout(RuntimeError):
    """The request ran past its time limit (answered 503)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    path: str
    classes: tuple[str, ...]
    image_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    execution_path: str = ""  # e.g. "bf16-explicit" or "bf16-explicit+tta-flip"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path,
                "classes": list(self.classes), "image_size": self.image_size,
                "execution_path": self.execution_path}


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def prediction_to_json(p: Any) -> dict[str, Any]:
    """The REST/CSV view of an ``inference.Prediction``."""
    return {
        "class": p.label,
        "class_name": TAXONOMY.cls(p.label).name,
        "confidence": round(float(p.confidence), 6),
        "probabilities": {k: round(float(v), 6) for k, v in p.probs.items()},
        "top_k": [{"class": c, "probability": round(float(v), 6)} for c, v in p.top_k],
        "group": p.group,
        "group_name": p.group_name,
        "uncertain": bool(p.uncertain),
        "uncertain_reason": p.uncertain_reason or None,
        "group_answer": p.group_answer or None,
        "unfamiliar": bool(p.unfamiliar),
        "unfamiliar_score": _finite(p.unfamiliar_score),
        "unfamiliar_note": getattr(p, "unfamiliar_note", "") or None,
    }


@dataclass(frozen=True)
class FileResult:
    """The outcome for one uploaded file: a prediction or an error, never both."""

    filename: str
    prediction: Any | None = None
    error: UploadError | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    def to_json(self) -> dict[str, Any]:
        if self.prediction is None:
            assert self.error is not None
            return {"filename": self.filename, "error": {"code": self.error.code,
                                                          "message": self.error.message}}
        return {"filename": self.filename, **prediction_to_json(self.prediction)}


def _model_info(predictor: Any, path: str) -> ModelInfo:
    """Name, version and input size of the predictor's model, from its model directory."""
    spec = getattr(predictor, "spec", None)
    classes = tuple(getattr(spec, "class_names", None) or TAXONOMY.ids)
    prep = dict(getattr(spec, "preprocessing", None) or {})
    source = str(getattr(spec, "source", "") or path)
    config: dict[str, Any] = {}
    model_dir = getattr(spec, "model_dir", None)
    if model_dir is not None:
        from celluscan.models import ModelDirError, read_model_dir_info

        try:
            config = read_model_dir_info(model_dir).config
        except (ModelDirError, OSError):
            config = {}
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    arch = config.get("architecture") if isinstance(config.get("architecture"), dict) else {}
    weights = config.get("weights") if isinstance(config.get("weights"), dict) else {}
    name = str(metadata.get("name") or arch.get("name") or Path(source).name or "model")
    version = metadata.get("version")
    if not version and weights.get("sha256"):
        version = f"sha256:{str(weights['sha256'])[:12]}"
    return ModelInfo(name=name, version=str(version or "unversioned"), path=source,
                     classes=classes, image_size=int(prep.get("image_size") or 0),
                     metadata=dict(metadata), execution_path=str(getattr(predictor, "path_name", "") or ""))


class FairLock:
    """A lock granted in arrival order (``threading.Lock`` lets a waiter starve under load,
    which shows up as a long latency tail when many requests queue for the model)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def acquire(self, timeout: float = -1) -> bool:
        with self._mutex:
            if not self._held and not self._waiters:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(None if timeout < 0 else timeout):
            return True  # release() handed the lock straight to us
        with self._mutex:
            if turn.is_set():  # handed over just as we gave up: keep it
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            if self._waiters:
                self._waiters.popleft().set()  # ownership passes on; _held stays True
            else:
                self._held = False

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelService:
    """Classify uploads with a predictor, safely, from many threads."""

    def __init__(self, predictor: Any, limits: ServingLimits = ServingLimits(),
                 model_path: str = ""):
        self.predictor = predictor
        self.limits = limits
        self.info = _model_info(predictor, model_path)
        self.app_version = __version__
        self._model_lock = FairLock()
        self._count_lock = threading.Lock()
        self._admitted = 0

    @classmethod
    def from_model_dir(cls, path: str | Path | None = None,
                       limits: ServingLimits = ServingLimits(), tta: str = "none") -> "ModelService":
        """``tta``: test-time augmentation for every prediction (``inference.tta``)."""
        from celluscan.inference.predictor import Predictor

        predictor = Predictor.from_model_dir(path, batch_size=limits.batch_size, tta=tta)
        return cls(predictor, limits, str(path) if path is not None else "default")

    # ---------------------------------------------------------------- classification (sync)

    def _predict_batch(self, names: list[str], images: list[Any], deadline: float) -> list[FileResult]:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._model_lock.acquire(timeout=remaining):
            raise ServiceTimeout("timed out waiting for the model")
        try:
            try:
                preds = list(self.predictor.predict_images(images))
                if len(preds) != len(images):
                    raise RuntimeError(f"predictor returned {len(preds)} results for {len(images)} images")
                return [FileResult(n, prediction=p) for n, p in zip(names, preds)]
            except Exception:
                if len(images) == 1:
                    log.exception("classification failed for %s", names[0])
                    return [FileResult(names[0], error=UploadError(
                        "classification_failed", "the model could not classify this image"))]
        finally:
            self._model_lock.release()
        # A batch failed: retry one image at a time so one bad image cannot sink the rest.
        out: list[FileResult] = []
        for n, img in zip(names, images):
            out.extend(self._predict_batch([n], [img], deadline))
        return out

    def classify(self, uploads: Sequence[Upload], progress: ProgressFn | None = None,
                 timeout_s: float | None = None) -> list[FileResult]:
        """Decode and classify ``uploads`` in order; errors become per-file results.

        Raises :class:`ServiceTimeout` past ``timeout_s`` (default: the limits' timeout).
        """
        deadline = time.monotonic() + (self.limits.inference_timeout_s if timeout_s is None else timeout_s)
        image_limits = self.limits.image_limits()
        results: list[FileResult | None] = [None] * len(uploads)
        pending: list[tuple[int, str, Any]] = []
        done = 0

        def flush() -> None:
            nonlocal done
            if not pending:
                return
            batch = self._predict_batch([n for _, n, _ in pending], [im for _, _, im in pending], deadline)
            for (i, _, _), r in zip(pending, batch):
                results[i] = r
            done += len(pending)
            pending.clear()
            if progress is not None:
                progress(done, len(uploads))

        for i, up in enumerate(uploads):
            if time.monotonic() > deadline:
                raise ServiceTimeout("request ran past its time limit")
            if up.error is not None or up.data is None:
                results[i] = FileResult(up.name, error=up.error or UploadError("empty", "no data"))
                done += 1
                continue
            try:
                image = load_image_bytes(up.data, up.name, image_limits)
            except ImageLoadError as e:
                code = "too_large" if "over the limit" in e.reason else "invalid_image"
                results[i] = FileResult(up.name, error=UploadError(code, e.reason))
                done += 1
                continue
            pending.append((i, up.name, image))
            if len(pending) >= self.limits.batch_size:
                flush()
        flush()
        if progress is not None:
            progress(len(uploads), len(uploads))
        return [r for r in results if r is not None]

    def predict_image(self, image: Any, name: str = "image", timeout_s: float | None = None) -> FileResult:
        """Classify one decoded image (the web UI's single-cell view)."""
        deadline = time.monotonic() + (self.limits.inference_timeout_s if timeout_s is None else timeout_s)
        return self._predict_batch([name], [image], deadline)[0]

    def explain(self, image: Any) -> Any:
        """The attention-rollout heatmap of ``image`` overlaid on it (a PIL image)."""
        from celluscan.inference.explain import overlay_heatmap

        with self._model_lock:
            heatmap = self.predictor.explain(image)
        return overlay_heatmap(image, heatmap)

    # ---------------------------------------------------------------- async entry point

    def _admit(self) -> None:
        with self._count_lock:
            if self._admitted > self.limits.max_waiting_requests:
                raise ServiceBusy(
                    f"the server is busy ({self._admitted} requests in progress or waiting); "
                    "retry shortly")
            self._admitted += 1

    def _release(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread, within the request time limit.

        Raises :class:`ServiceBusy` when too many requests are already admitted and
        :class:`ServiceTimeout` past ``limits.inference_timeout_s``. On timeout the worker is
        abandoned (it stops at its next batch boundary, see :meth:`classify`), so the event
        loop answers at once instead of waiting for it.
        """
        self._admit()

        def work() -> T:
            try:
                return fn(*args)
            finally:
                self._release()

        try:
            with anyio.fail_after(self.limits.inference_timeout_s + 1.0):
                return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except TimeoutError:
            raise ServiceTimeout("request ran past its time limit") from None

    @property
    def in_flight(self) -> int:
        with self._count_lock:
            return self._admitted
