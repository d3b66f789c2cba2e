"""The predictor: images in, calibrated and flagged predictions out, on the fastest safe path.

>>> from celluscan.inference import Predictor
>>> predictor = Predictor.from_model_dir("runs/x/model")          # backend/precision "auto"
>>> for path, result in predictor.predict_paths(["a.jpg", "b.png"]):
...     print(path, result)           # a Prediction, or an ImageLoadError naming the problem

Images are decoded and preprocessed (pad to square, resize: ``data.transforms.preprocess``)
on ``workers`` threads while the model runs on the previous batch, in input order. With
``workers=None`` (the default) :meth:`Predictor.predict_paths` times decoding and the model on
the run's first images and shares the cores between them accordingly (``inference.core_split``:
a small model gets its own core and the decoder the other, instead of both fighting over two).

``backend="auto"`` uses PyTorch; ``precision="auto"`` picks bf16 when the CPU runs bf16
natively and a probe batch gives fp32's top-1 (see :func:`choose_path`), else fp32. Which
attention kernel is fastest per precision is in :data:`FASTEST_ATTENTION` (measured by
``bench/inference.py``; see BENCHMARKS.md "Inference").
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from celluscan.data.batch_augment import EvalPreprocess
from celluscan.data.imageio import ImageLimits, ImageLoadError, ensure_rgb, load_image
from celluscan.data.canonical import CanonicalConfig
from celluscan.data.transforms import preprocess, preprocess_view
from celluscan.inference.backends import (
    ExecutionPath,
    OnnxRunner,
    TorchRunner,
    configure_threads,
    cpu_supports_bf16,
    synthetic_batch,
)
from celluscan.inference.batching import batched_results, ordered_map, phased_map
from celluscan.inference.core_split import SKIP_SPLIT_RATIO, CoreSplit, plan_core_split
from celluscan.inference.ood import OODScorer
from celluscan.inference.tta import TestTimeAugmentation, with_tta
from celluscan.inference.uncertainty import UncertaintyPolicy, assess_uncertainty
from celluscan.taxonomy import CLASSES, TAXONOMY

__all__ = [
    "Prediction",
    "Predictor",
    "ModelSpec",
    "ModelNotFoundError",
    "DEFAULT_MODEL_DIR",
    "FASTEST_ATTENTION",
    "choose_path",
    "resolve_model_source",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(str(resources.files("celluscan").joinpath("assets", "default_model")))
ONNX_FILE = "model.onnx"
TOP_K = 3

# Fastest attention kernel per (precision, jit) on CPU (True = fused SDPA), measured with
# bench/inference.py on ViT-B/16 (BENCHMARKS.md "Inference").
# fp32: SDPA is faster; bf16: explicit and SDPA are within noise eager (explicit ahead at
# batch 1-8) and explicit is ahead traced, where oneDNN Graph fuses the softmax chain.
FASTEST_ATTENTION = {("fp32", False): True, ("bf16", False): False,
                     ("fp32", True): True, ("bf16", True): False}


class ModelNotFoundError(FileNotFoundError):
    """No usable model at the given (or default) location; the message says what to pass."""


@dataclass
class Prediction:
    """One image's result. ``probs`` maps every class id to its temperature-scaled
    probability, in canonical order; ``top_k`` is the 3 most likely (class, prob)."""

    label: str
    confidence: float
    probs: dict[str, float]
    group: str
    group_name: str
    top_k: list[tuple[str, float]]
    uncertain: bool
    uncertain_reason: str
    group_answer: str
    unfamiliar: bool
    unfamiliar_score: float
    unfamiliar_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_k"] = [list(t) for t in self.top_k]
        return d


@dataclass(frozen=True)
class ModelSpec:
    """What inference needs to know about a model, whatever backend runs it."""

    class_names: tuple[str, ...]
    preprocessing: dict[str, Any]
    ood: Mapping[str, Any] | None = None
    model_dir: Path | None = None  # holds model.safetensors (PyTorch weights), if known
    source: str = ""

    @classmethod
    def from_config(cls, document: Mapping[str, Any], class_names: Sequence[str],
                    preprocessing: Mapping[str, Any], model_dir: Path | None, source: str) -> "ModelSpec":
        metadata = document.get("metadata") if isinstance(document.get("metadata"), Mapping) else {}
        ood = document.get("ood") or metadata.get("ood")
        unknown = [c for c in class_names if c not in CLASSES]
        if unknown:
            raise ValueError(f"{source}: class names {unknown} are not CelluScan classes "
                             f"(known: {', '.join(CLASSES)})")
        return cls(tuple(class_names), dict(preprocessing), ood, model_dir, source)


@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    onnx_path: Path | None  # an exported graph, when there is one
    named_onnx: bool = False  # the caller pointed at the .onnx file itself


def _missing_default_message() -> str:
    return (f"no model given and the default model is not installed (looked in {DEFAULT_MODEL_DIR}). "
            "Pass --model MODEL_DIR: a directory with config.json and model.safetensors, as "
            "written by `celluscan train` (RUN/model), or a model.onnx from `celluscan export`.")


def resolve_model_source(path: str | os.PathLike | None) -> ModelSource:
    """Find the model a path names: a model directory (``config.json`` + weights, optionally
    ``model.onnx``), or an ``.onnx`` file (metadata from a ``config.json`` beside it, else the
    graph's own metadata). ``None`` means the shipped default model."""
    from celluscan.models import ModelDirError, read_model_dir_info

    if path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelNotFoundError(_missing_default_message())
        path = DEFAULT_MODEL_DIR
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: model not found (no such file or directory)")
    if p.is_file():
        if p.suffix.lower() != ".onnx":
            raise ModelNotFoundError(f"{p}: not a model: pass a model directory or an .onnx file")
        if (p.parent / "config.json").is_file():
            info = read_model_dir_info(p.parent)
            model_dir = p.parent if (p.parent / "model.safetensors").is_file() else None
            spec = ModelSpec.from_config(info.config, info.class_names, info.preprocessing,
                                         model_dir, str(p))
        else:
            from celluscan.inference.export import read_onnx_metadata

            meta = read_onnx_metadata(p)
            spec = ModelSpec.from_config(meta, meta["class_names"], meta["preprocessing"], None, str(p))
        return ModelSource(spec, p, named_onnx=True)
    try:
        info = read_model_dir_info(p)
    except ModelDirError as e:
        raise ModelNotFoundError(str(e)) from None
    onnx = p / ONNX_FILE
    spec = ModelSpec.from_config(info.config, info.class_names, info.preprocessing, p, str(p))
    return ModelSource(spec, onnx if onnx.is_file() else None)


def _top1_agrees(reference: torch.Tensor, candidate: torch.Tensor, tie: float = 0.1) -> bool:
    """Top-1 agreement, forgiving near-ties: where fp32's top two logits are within ``tie``
    either class is an acceptable answer."""
    if not torch.isfinite(candidate).all():
        return False
    ref_top = reference.argmax(-1)
    cand_top = candidate.argmax(-1)
    rows = torch.arange(reference.shape[0])
    gap = reference[rows, ref_top] - reference[rows, cand_top]
    return bool(((ref_top == cand_top) | (gap < tie)).all())


def choose_path(model: torch.nn.Module, image_size: int, precision: str = "auto",
                attention: str = "auto", jit: bool = False) -> tuple[TorchRunner, str]:
    """Build the runner for a PyTorch precision request; returns (runner, note).

    ``precision="auto"``: bf16 when :func:`cpu_supports_bf16` and a probe batch agrees with
    fp32 on top-1 (near-ties forgiven), else fp32. ``attention``: "auto" (the fastest kernel
    for the precision, :data:`FASTEST_ATTENTION`), "fused" or "explicit". ``jit``: trace and
    fuse (see ``backends``; pays off only for thousands of images)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if attention not in ("auto", "fused", "explicit"):
        raise ValueError(f"attention must be auto, fused or explicit, got {attention!r}")

    def runner_for(prec: str, with_jit: bool = jit) -> TorchRunner:
        fused = FASTEST_ATTENTION[prec, with_jit] if attention == "auto" else attention == "fused"
        return TorchRunner(model, ExecutionPath("torch", prec, fused, jit=with_jit))

    def with_note(runner: TorchRunner, note: str = "") -> tuple[TorchRunner, str]:
        return runner, "; ".join(n for n in (note, runner.note) if n)

    if precision == "fp32":
        return with_note(runner_for("fp32"))
    if precision == "bf16":
        note = "" if cpu_supports_bf16() else "bf16 requested but this CPU has no native bf16: slow"
        if note:
            log.warning(note)
        return with_note(runner_for("bf16"), note)
    if not cpu_supports_bf16():
        return with_note(runner_for("fp32"), "fp32: this CPU has no native bf16")
    probe = synthetic_batch(image_size)
    reference = runner_for("fp32", with_jit=False)(probe)[0]
    fast = runner_for("bf16", with_jit=False)  # the probe checks bf16 numerics, not tracing
    if _top1_agrees(reference, fast(probe)[0]):
        return with_note(runner_for("bf16") if jit else fast)
    note = "bf16 disagreed with fp32 on a probe batch: using fp32"
    log.warning(note)
    return with_note(runner_for("fp32"), note)


DEFAULT_DECODE_WORKERS = 2
"""Decode threads when ``workers`` is not given and no plan was made (few images)."""
PLAN_PROBE_IMAGES = 8
"""Images decoded inline and run through the model to plan a batch run's cores; runs with
fewer images are not planned (there is nothing to gain)."""


class Predictor:
    """Classifies images with one model on one execution path (see the module docstring)."""

    def __init__(self, runner, spec: ModelSpec, batch_size: int = 32, workers: int | None = None,
                 policy: UncertaintyPolicy = UncertaintyPolicy(), note: str = "",
                 limits: ImageLimits = ImageLimits()):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0 (or None: planned per run), got {workers}")
        self.runner = runner
        self.spec = spec
        self.batch_size = int(batch_size)
        self.workers = None if workers is None else int(workers)
        """Decode threads; ``None``: planned per run from measured costs (module docstring)."""
        self.last_core_split: CoreSplit | None = None
        """The plan :meth:`predict_paths` used last (``None`` when ``workers`` was given)."""
        self.policy = policy
        self.note = note
        self.limits = limits
        prep = spec.preprocessing
        self.image_size = int(prep["image_size"])
        self.pad_fill = prep.get("pad_fill", "edge")
        self.canonical = CanonicalConfig.from_dict(prep.get("canonical"))
        self.temperature = float(prep.get("temperature", 1.0))
        self.normalise = EvalPreprocess(self.image_size, prep["mean"], prep["std"])
        self.ood = OODScorer.from_config(spec.ood, spec.model_dir)
        self._explain_model: torch.nn.Module | None = None

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_model_dir(
        cls,
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        precision: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        threshold: float = 0.6,
        attention: str = "auto",
        threads: int | None = None,
        jit: bool = False,
        tta: str = "none",
    ) -> "Predictor":
        """Load a model directory (or an .onnx file; ``None``: the shipped default model).

        backend: "auto" (ONNX when ``path`` is an .onnx file, else PyTorch), "torch", "onnx"
        (``model.onnx`` in the directory). precision: "auto", "fp32", "bf16" (PyTorch only).
        threshold: top probability under which a prediction is flagged uncertain.
        attention: "auto", "fused" or "explicit" (PyTorch). jit: TorchScript + oneDNN Graph
        fusion (PyTorch; ~15-30 s of warm-up, worth it for thousands of images or a server).
        tta: test-time augmentation, "none", "flip" (2 passes) or "d8" (8): logits averaged
        over the cell's symmetric views (``inference.tta``).
        """
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
        configure_threads(threads)
        source = resolve_model_source(path)
        spec = source.spec
        policy = UncertaintyPolicy(threshold=threshold)
        use_onnx = backend == "onnx" or (backend == "auto" and source.named_onnx)
        if use_onnx:
            if source.onnx_path is None:
                raise ModelNotFoundError(
                    f"{spec.source}: no {ONNX_FILE} here; create it with "
                    f"`celluscan export --format onnx {spec.source} {Path(spec.source) / ONNX_FILE}`")
            if precision == "bf16":
                raise ValueError("bf16 is a PyTorch path; the ONNX backend runs the exported graph")
            runner = OnnxRunner(source.onnx_path, threads)
            return cls(with_tta(runner, tta), spec, batch_size, workers, policy)
        if spec.model_dir is None:
            raise ModelNotFoundError(f"{spec.source}: the PyTorch backend needs model.safetensors "
                                     "beside config.json; use --backend onnx for an .onnx file")
        from celluscan.models import load_model_dir

        model, _info = load_model_dir(spec.model_dir)
        runner, note = choose_path(model, int(spec.preprocessing["image_size"]), precision, attention, jit)
        return cls(with_tta(runner, tta), spec, batch_size, workers, policy, note)

    @property
    def path_name(self) -> str:
        """The execution path in use, e.g. ``bf16-fused``, ``onnx-fp32`` or, with test-time
        augmentation, ``bf16-explicit+tta-flip``."""
        return self.runner.path.name + ("" if self.tta == "none" else f"+tta-{self.tta}")

    @property
    def tta(self) -> str:
        """The test-time augmentation mode (``inference.tta``): none, flip or d8."""
        return self.runner.mode if isinstance(self.runner, TestTimeAugmentation) else "none"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    # ---- image preparation ------------------------------------------------------------------

    def prepare(self, img: Image.Image) -> np.ndarray:
        """PIL image -> padded, resized uint8 array (S, S, 3)."""
        return np.asarray(preprocess(ensure_rgb(img), self.image_size, self.pad_fill, self.canonical),
                          dtype=np.uint8)

    def load_and_prepare(self, path: str | os.PathLike) -> np.ndarray:
        """Read an image file safely and :meth:`prepare` it; raises only ``ImageLoadError``."""
        img = load_image(path, self.limits)
        try:
            return self.prepare(img)
        except (ValueError, OSError, MemoryError) as e:
            raise ImageLoadError(str(path), f"cannot preprocess image: {e}") from None

    def to_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 arrays (S, S, 3) -> normalised float batch (B, 3, S, S)."""
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return self.normalise(batch)

    # ---- prediction -------------------------------------------------------------------------

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised batch -> (logits, [CLS] features or None), fp32."""
        return self.runner(x)

    def predictions_from_logits(self, logits: torch.Tensor,
                                features: torch.Tensor | None = None) -> list[Prediction]:
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.ood.needs_features and features is None:
            scores = torch.full((logits.shape[0],), float("nan"))
            flags = [False] * logits.shape[0]
            note = "this graph has no [CLS] features output: unfamiliar score unavailable"
        else:
            scores = self.ood.score(logits, features)
            flags = self.ood.flags(scores)
            note = self.ood.note
        names = self.class_names
        canonical = [c for c in CLASSES if c in names]
        column = {c: i for i, c in enumerate(names)}
        out = []
        for row, score, flag in zip(probs.tolist(), scores.tolist(), flags):
            order = sorted(range(len(row)), key=lambda i: -row[i])
            label = names[order[0]]
            verdict = assess_uncertainty(row, names, self.policy)
            group = TAXONOMY.group_of(label)
            out.append(Prediction(
                label=label,
                confidence=float(row[order[0]]),
                probs={c: float(row[column[c]]) for c in canonical},
                group=group,
                group_name=TAXONOMY.groups[group].name,
                top_k=[(names[i], float(row[i])) for i in order[:TOP_K]],
                uncertain=verdict.uncertain,
                uncertain_reason=verdict.reason,
                group_answer=verdict.group_answer,
                unfamiliar=bool(flag),
                unfamiliar_score=float(score),
                unfamiliar_note=note,
            ))
        return out

    def predict_arrays(self, arrays: Sequence[np.ndarray]) -> list[Prediction]:
        """Prepared uint8 arrays (see :meth:`prepare`) -> predictions, in batches."""
        out: list[Prediction] = []
        for start in range(0, len(arrays), self.batch_size):
            logits, features = self.run(self.to_batch(arrays[start:start + self.batch_size]))
            out.extend(self.predictions_from_logits(logits, features))
        return out

    def predict_images(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Classify decoded PIL images (any mode; converted to RGB)."""
        workers = DEFAULT_DECODE_WORKERS if self.workers is None else self.workers
        loaded = ordered_map(self.prepare, images, workers if len(images) > 1 else 0,
                             window=self.batch_size * 2, errors=())
        results = batched_results(loaded, self.batch_size, self.predict_arrays)
        return [r for _, r in results]  # type: ignore[misc]

    def predict_paths(self, paths: Iterable[str | os.PathLike]
                      ) -> Iterator[tuple[str | os.PathLike, Prediction | ImageLoadError]]:
        """Classify image files in input order, decoding ahead on worker threads. A file that
        cannot be used yields its :class:`ImageLoadError` instead; the rest still run. With
        ``workers=None`` the cores are shared as :meth:`plan_cores` decides."""
        if self.workers is not None:
            self.last_core_split = None
            loaded = ordered_map(self.load_and_prepare, paths, self.workers,
                                 window=self.batch_size * 3, errors=(ImageLoadError,))
            return batched_results(loaded, self.batch_size, self.predict_arrays)  # type: ignore[return-value]
        return self._predict_paths_planned(iter(paths))

    def _load_or_error(self, path: str | os.PathLike) -> np.ndarray | ImageLoadError:
        try:
            return self.load_and_prepare(path)
        except ImageLoadError as e:
            return e

    def _predict_paths_planned(self, paths: Iterator[str | os.PathLike]
                               ) -> Iterator[tuple[str | os.PathLike, Prediction | ImageLoadError]]:
        head = list(itertools.islice(paths, PLAN_PROBE_IMAGES))
        start = time.perf_counter()
        head_loaded = [(p, self._load_or_error(p)) for p in head]
        decode_ms = (time.perf_counter() - start) * 1000 / max(1, len(head))
        arrays = [r for _, r in head_loaded if not isinstance(r, ImageLoadError)]
        threads_before = torch.get_num_threads()
        plan = self.plan_cores(decode_ms, arrays) if len(head) == PLAN_PROBE_IMAGES else None
        self.last_core_split = plan
        workers = DEFAULT_DECODE_WORKERS if plan is None else plan.decode_workers
        try:
            if plan is not None and plan.model_threads != threads_before:
                torch.set_num_threads(plan.model_threads)
            if plan is not None and plan.mode == "shared":  # phases: see inference.core_split
                ready = sum(not isinstance(r, ImageLoadError) for _, r in head_loaded)
                rest = phased_map(self.load_and_prepare, paths, workers, self.batch_size,
                                  errors=(ImageLoadError,),
                                  first_chunk=self.batch_size - ready % self.batch_size)
            else:
                rest = ordered_map(self.load_and_prepare, paths, workers,
                                   window=self.batch_size * 3, errors=(ImageLoadError,))
            yield from batched_results(itertools.chain(head_loaded, rest), self.batch_size,
                                       self.predict_arrays)  # type: ignore[misc]
        finally:
            if torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)

    def plan_cores(self, decode_ms: float, arrays: Sequence[np.ndarray]) -> CoreSplit | None:
        """Time the model per image on these prepared images, on all cores and (when it could
        matter) on one, and plan the run with :func:`~celluscan.inference.core_split.plan_core_split`.
        ``None`` (keep the defaults) for a backend whose threads are fixed (ONNX) or no images."""
        if not arrays or self.runner.path.backend != "torch":
            return None
        cores = torch.get_num_threads()
        x = self.to_batch(list(arrays))

        def ms_per_image() -> float:
            start = time.perf_counter()
            self.run(x)
            return (time.perf_counter() - start) * 1000 / x.shape[0]

        ms_per_image()  # warm-up: first-call allocations and kernel selection
        ms_all = ms_per_image()
        ms_one = None
        if cores > 1 and ms_all < SKIP_SPLIT_RATIO * decode_ms:
            try:
                torch.set_num_threads(1)
                ms_per_image()
                ms_one = ms_per_image()
            finally:
                torch.set_num_threads(cores)
        plan = plan_core_split(cores, decode_ms, ms_all, ms_one, DEFAULT_DECODE_WORKERS)
        log.info("core split %s", plan.describe())
        return plan

    # ---- explanations -----------------------------------------------------------------------

    def explanation_model(self) -> torch.nn.Module:
        """The PyTorch model used for attention maps (loaded on demand for ONNX backends)."""
        runner = self.runner.runner if isinstance(self.runner, TestTimeAugmentation) else self.runner
        if isinstance(runner, TorchRunner):
            return runner.model
        if self._explain_model is None:
            if self.spec.model_dir is None:
                raise ModelNotFoundError(f"{self.spec.source}: explanations need the PyTorch weights "
                                         "(a model directory with model.safetensors)")
            from celluscan.models import load_model_dir

            self._explain_model, _ = load_model_dir(self.spec.model_dir)
        return self._explain_model

    def explain(self, img: Image.Image) -> np.ndarray:
        """Attention-rollout heatmap (H, W) in [0, 1] over the original image ``img``."""
        from celluscan.inference.explain import rollout_heatmap

        rgb = img.convert("RGB")
        return rollout_heatmap(self.explanation_model(), self.to_batch([self.prepare(rgb)]), rgb.size,
                               view=preprocess_view(rgb, self.canonical))
