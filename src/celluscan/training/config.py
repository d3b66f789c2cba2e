"""Training configuration: nested dataclasses read from YAML, overridable with ``--set a.b=v``.

The config is data. Every field is documented here; ``configs/*.yaml`` only list the fields a
stage changes. Loading is strict: an unknown key, or a value of the wrong type, is an error that
names the file and the key. ``--set optim.lr=1e-4`` values are parsed as YAML scalars and then
checked against the dataclass field's type, exactly like values from the file.

>>> cfg = load_config(None, ["optim.lr=1e-4", "train.epochs=2"])
>>> cfg.optim.lr, cfg.train.epochs, cfg.optim.weight_decay
(0.0001, 2, 0.01)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from celluscan.data.batch_augment import AugmentConfig
from celluscan.data.canonical import CanonicalConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "CheckpointConfig",
    "EvalConfig",
    "LogConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "dump_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the key."""


@dataclass
class DataConfig:
    """Where the images come from and how each epoch draws them."""

    dataset: str = "datasets/blood-cells"
    """Dataset directory written by ``celluscan ingest`` (manifest.csv with a split column,
    stats.json with mean/std). Relative paths are relative to the working directory."""
    cache_size: int = 0
    """Side (px) at which every image is decoded once into the uint8 tensor cache; 0 means
    ``model.image_size``. Larger than the model size leaves room for zoom-in augmentation."""
    cache_dir: str | None = None
    """Where the decoded tensor cache is stored; default ``DATASET/cache``."""
    workers: int = 2
    """Processes used to decode images when the tensor cache is first built."""
    subset_fraction: float = 1.0
    """Fraction of the training split used (stratified by class, fixed by ``seed``): the
    original's three stages used 0.05, 0.20 and 1.0. Validation and test are never subset."""
    sampler: Literal["shuffle", "balanced", "class_balanced"] = "shuffle"
    """How an epoch's images are drawn. ``shuffle``: every training image once (the original).
    ``balanced``: every class topped up to ``balance_target`` images by drawing extra copies of
    minority-class images that get TrivialAugmentWide (data.balance.balanced_indices).
    ``class_balanced``: as many draws as training images, each class equally likely."""
    balance_target: int = 0
    """Images per class per epoch for ``sampler: balanced``; 0 = the largest class's count."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Batched on-device augmentation (data.batch_augment.AugmentConfig fields)."""
    canonical: CanonicalConfig = field(default_factory=CanonicalConfig)
    """Canonical framing/colour applied to every image before caching and, through the model's
    preprocessing, at inference (data.canonical.CanonicalConfig fields, e.g.
    ``{framing: nucleus, colour: grey, framing_scale: 3.0}``); the default is plain pad and
    resize."""
    colour_stage: Literal["cache", "batch"] = "cache"
    """Where training applies ``canonical.colour``. ``cache``: to every image before caching,
    so augmentation jitters already-normalised colours. ``batch``: after augmentation, on each
    batch (data.batch_augment.colour_batch; ``reinhard`` only), so the model sees exactly what
    inference gives it: a shifted image, then normalised. Inference is the same either way."""


@dataclass
class ModelConfig:
    """Which network to train and from what weights."""

    name: str = "vit_b_16"
    """A registered model: vit_b_16, vit_s_16, vit_ti_16, vit_test, torchvision_vit_b_16."""
    image_size: int = 224
    """Input side in pixels (a multiple of the patch size)."""
    conv_stem: bool = False
    """Replace the 16x16 patchify conv by a small convolutional stem."""
    dropout: float = 0.0
    """Dropout in the MLPs and after the position embeddings."""
    drop_path: float = 0.0
    """Stochastic depth: the chance of skipping a block's residual branch for a sample, rising
    linearly from 0 at the first block to this value at the last (training only)."""
    pretrained: str | None = None
    """Optional local weights file (safetensors) to start from (models.load_pretrained)."""
    finetune: Literal["full", "linear_probe", "last_n_blocks"] = "full"
    """Which parameters train: all, only the head, or the head + the last ``finetune_last_n``
    encoder blocks (models.apply_finetune_mode)."""
    finetune_last_n: int = 2
    """Blocks trained with ``finetune: last_n_blocks``."""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule. Defaults are the original's: AdamW 3e-4, wd 1e-2,
    constant learning rate."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimiser."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 1e-2
    """Decoupled weight decay (AdamW) / L2 (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    momentum: float = 0.9
    """SGD momentum."""
    fused: bool = True
    """Use the fused single-kernel optimiser step (CPU and CUDA): same maths, ~5x faster
    than the per-tensor loop on CPU, where the AdamW step was ~30% of a ViT-B training step."""
    no_decay_norm_bias: bool = False
    """Exempt biases, norms, position embeddings and [CLS] from weight decay (modern recipe)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """``constant`` (the original) or linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (fractions allowed); applies to both schedules."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of ``lr``."""


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 7
    """Epochs to train (the original's stage 3: 7, then another 5 with ``--init-from``)."""
    stop_after: int = 0
    """Stop after this many epochs (0: after ``epochs``) while the learning-rate schedule stays
    laid out for ``epochs``: reproduces a run that was cut short at a deadline."""
    batch_size: int = 32
    """Global batch size (split across processes under torchrun)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 autocast where the device supports it (CUDA, or a CPU with native bf16),
    else fp32. Master weights and the optimiser state stay fp32."""
    attention: Literal["auto", "fused", "explicit"] = "auto"
    """Attention kernel: ``auto`` picks explicit softmax attention for bf16 on CPU (measured
    faster) and fused SDPA elsewhere."""
    compile: bool = False
    """torch.compile the training forward (helps on CUDA; slower on CPU with bf16)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (original: 0)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""
    mixup_alpha: float = 0.0
    """Beta(alpha, alpha) for mixup; 0 disables."""
    cutmix_alpha: float = 0.0
    """Beta(alpha, alpha) for cutmix; 0 disables. With both on, each batch picks one at random."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when mixup or cutmix is on)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (e.g. 0.999); 0 disables. When on, the EMA
    weights are validated and exported."""
    threads: int = 0
    """torch CPU threads; 0 = all cores (os.cpu_count())."""
    distill_from: tuple[str, ...] = ()
    """Teacher model directories (training.distill): each training image's target blends its
    label with the teachers' mean probability on it. Empty: plain labels."""
    distill_weight: float = 0.5
    """The teachers' share of the target when ``distill_from`` is set (0: labels only, 1:
    teachers only)."""


@dataclass
class CheckpointConfig:
    """How often the run is saved. Saves are atomic; a killed run resumes from the last one."""

    every_steps: int = 200
    """Also save every this many optimiser steps inside an epoch; 0 = only at epoch ends."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""


@dataclass
class EvalConfig:
    """Validation during training and the final report."""

    batch_size: int = 128
    """Images per forward pass when evaluating."""
    fit_temperature: bool = True
    """After training, fit a softmax temperature on the validation split and store it in the
    exported model directory (preprocessing.temperature)."""
    test_at_end: bool = True
    """Evaluate the best model on the test split at the end (RUN/metrics.json)."""
    fit_ood: bool = True
    """Fit the unfamiliar-image detector (class-conditional Mahalanobis distance on the [CLS]
    features of the training split; threshold flags 3.5% of validation images, under the 5% ceiling) and store it in
    the exported model directory (ood.safetensors + metadata.ood)."""


@dataclass
class LogConfig:
    """Progress reporting."""

    progress_every_s: float = 30.0
    """When stderr is not a terminal, print a progress line this often (seconds)."""


@dataclass
class Config:
    """A complete training run."""

    seed: int = 0
    """Seeds model init, data order and augmentation: the run is a pure function of it."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    out: str | None = None
    """Run directory; ``--out`` overrides; default ``runs/<config name>-<time>``."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "Config":
        problems = []
        if not 0.0 < self.data.subset_fraction <= 1.0:
            problems.append(f"data.subset_fraction must be in (0, 1], got {self.data.subset_fraction}")
        for name, value in [("train.epochs", self.train.epochs), ("train.batch_size", self.train.batch_size),
                            ("eval.batch_size", self.eval.batch_size), ("model.image_size", self.model.image_size)]:
            if value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        for name, value in [("optim.lr", self.optim.lr), ("optim.weight_decay", self.optim.weight_decay),
                            ("train.grad_clip", self.train.grad_clip), ("train.ema_decay", self.train.ema_decay),
                            ("train.mixup_alpha", self.train.mixup_alpha),
                            ("train.cutmix_alpha", self.train.cutmix_alpha),
                            ("optim.warmup_epochs", self.optim.warmup_epochs),
                            ("checkpoint.every_steps", self.checkpoint.every_steps)]:
            if value < 0:
                problems.append(f"{name} must be >= 0, got {value}")
        if not 0.0 <= self.train.label_smoothing < 1.0:
            problems.append(f"train.label_smoothing must be in [0, 1), got {self.train.label_smoothing}")
        if not 0.0 <= self.train.distill_weight <= 1.0:
            problems.append(f"train.distill_weight must be in [0, 1], got {self.train.distill_weight}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            problems.append(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        if self.checkpoint.keep_last < 1:
            problems.append(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.train.stop_after < 0:
            problems.append(f"train.stop_after must be >= 0, got {self.train.stop_after}")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self


# ------------------------------------------------------------------------------------------
# Typed conversion: YAML data -> dataclasses
# ------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: a value is required (got null)")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, data: dict, where: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, data)) - set(names))
    if unknown:
        prefix = f"{where}." if where and not where.endswith(":") else where
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key" + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else "")
            + f"; known keys here: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            sub = f"{where}.{name}" if where and not where.endswith(":") else f"{where}{name}"
            kwargs[name] = _coerce(data[name], hints[name], sub)
    return cls(**kwargs)


def config_from_dict(data: dict | None, source: str = "config") -> Config:
    """Build a :class:`Config` from plain data (e.g. parsed YAML); ``source`` names it in errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a YAML mapping, got {type(data).__name__}")
    return _from_dict(Config, data, f"{source}:")


def config_to_dict(cfg: Any) -> dict:
    """Plain data (lists, not tuples) for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``a.b=v`` strings; each value is parsed as YAML and typed by the target field."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        obj: Any = cfg
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise ConfigError(
                    f"--set {key}: unknown key {part!r} in {'.'.join(parts[:depth]) or 'the config'}; "
                    f"known: {', '.join(names)}"
                )
            if depth == len(parts) - 1:
                try:
                    value = yaml.safe_load(raw) if raw.strip() else ""
                except yaml.YAMLError as e:
                    raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
                tp = _hints(type(obj))[part]
                if dataclasses.is_dataclass(tp) and not isinstance(value, dict):
                    raise ConfigError(f"--set {key}: is a section; set one of its keys instead")
                setattr(obj, part, _coerce(value, tp, f"--set {key}"))
            else:
                obj = getattr(obj, part)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{p}: cannot read config: {e}") from None
    cfg = config_from_dict(data, source)
    apply_overrides(cfg, overrides)
    return cfg.validate()


def dump_config(cfg: Config) -> str:
    """The config as YAML text (every field, so a run records exactly what it used)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
