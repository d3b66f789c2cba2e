"""The training loop: uint8 cache -> device -> batched augmentation -> bf16 forward -> AdamW.

One step::

    indices (epoch_plan: pure function of seed, epoch)  ->  images uint8 (B,3,S,S) on device
      -> BatchAugment (TrivialAugmentWide on balancing copies, affine, colour)  -> float (B,3,s,s)
      -> mixup / cutmix (optional)  -> model under autocast(bf16)  -> cross-entropy  -> AdamW

Every step reseeds torch from ``(seed, epoch, batch, rank)``, so a step's augmentation, mixing
and dropout depend on nothing but its position: a run resumed from any checkpoint replays the
same remaining history as an uninterrupted one. At each epoch end the model (or its EMA) is
validated (:func:`celluscan.evaluation.metrics.compute_metrics`), the best by validation
macro-F1 is exported to ``RUN/model`` (a model directory), a checkpoint is written and
``RUN/history.json`` and the plots are refreshed. After the last epoch a temperature is fitted
on the validation split and the best model is evaluated on the test split.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from celluscan.data.atomic import atomic_write_text
from celluscan.data.batch_augment import BatchAugment, EvalPreprocess
from celluscan.evaluation.calibration import apply_temperature, fit_temperature
from celluscan.evaluation.metrics import compute_metrics, reliability_bins
from celluscan.evaluation.plots import plot_history, plot_reliability
from celluscan.evaluation.progress import ProgressMeter, format_seconds
from celluscan.evaluation.report import write_json, write_report
from celluscan.models import (
    apply_finetune_mode,
    create_model,
    load_model_dir,
    load_pretrained,
    save_model_dir,
    update_model_dir,
)
from celluscan.training import checkpoint as ckpt
from celluscan.training.config import Config, config_to_dict
from celluscan.training.data_source import SplitTensors, TrainData
from celluscan.training.device import autocast_dtype, resolve_device, set_cpu_threads
from celluscan.training.distributed import DistContext, all_reduce_sum, barrier, gather_rows
from celluscan.training.ema import ModelEMA
from celluscan.training.distill import blend_targets
from celluscan.training.mixup import BatchMixer, soft_cross_entropy
from celluscan.training.sampling import epoch_plan, rank_batches, step_seed
from celluscan.training.schedule import LRSchedule

__all__ = ["Trainer", "weights_digest", "TIMING_KEYS"]

#: History fields that measure wall time (they differ between otherwise identical runs).
TIMING_KEYS = ("epoch_seconds", "train_images_per_s")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, shapes, bytes): equal digests = equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _param_groups(model: nn.Module, weight_decay: float, exempt_norm_bias: bool) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exempt_norm_bias and (p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Trainer:
    """Builds model, optimiser and data pipeline from a :class:`Config` and runs the loop.

    ``log`` receives human-readable lines (rank 0 only). Use :meth:`restore` with a checkpoint
    from :func:`celluscan.training.checkpoint.load_latest` to resume, then :meth:`fit`.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, data: TrainData, *,
                 dist: DistContext | None = None, init_from: str | Path | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.data = data
        self.dist = dist or DistContext()
        self.is_main = self.dist.is_main
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if self.device.type == "cpu":
            set_cpu_threads(cfg.train.threads, self.dist.local_world_size)
        self.amp_dtype = autocast_dtype(self.device, cfg.train.precision)
        self.class_names = tuple(data.class_names)
        self.init_from = str(init_from) if init_from else None

        torch.manual_seed(cfg.seed)
        m = cfg.model
        model = create_model(m.name, num_classes=len(self.class_names), image_size=m.image_size,
                             conv_stem=m.conv_stem, dropout=m.dropout,
                             drop_path=m.drop_path)
        if m.pretrained:
            report = load_pretrained(model, m.pretrained)
            self.log(f"loaded pretrained weights from {m.pretrained} ({report.num_tensors} tensors)")
        if self.init_from:
            self._load_init(model, self.init_from)
        apply_finetune_mode(model, m.finetune, m.finetune_last_n if m.finetune == "last_n_blocks" else None)
        attention = cfg.train.attention
        if attention == "auto":
            model.set_attention_path_for(self.amp_dtype or torch.float32, self.device)
        else:
            model.set_fused_attn(attention == "fused")
        self.model = model.to(self.device)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        o = cfg.optim
        groups = _param_groups(self.model, o.weight_decay, o.no_decay_norm_bias)
        fused = o.fused if self.device.type in ("cpu", "cuda") else False
        if o.name == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=fused)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, fused=fused)

        self.train_model: nn.Module = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)

        image_size = m.image_size
        self.augment = BatchAugment(cfg.data.augment, image_size, data.mean, data.std,
                                    colour=data.batch_colour).to(self.device)
        self.eval_pre = EvalPreprocess(image_size, data.mean, data.std, colour=data.batch_colour).to(self.device)
        t = cfg.train
        self.mixer = BatchMixer(len(self.class_names), t.mixup_alpha, t.cutmix_alpha, t.mix_prob, t.label_smoothing)

        self.teacher_probs: torch.Tensor | None = None
        if t.distill_from:
            from celluscan.training.distill import teacher_probabilities

            self.teacher_probs = teacher_probabilities(
                t.distill_from, data.train.images, self.class_names, data.canonical,
                batch_size=cfg.eval.batch_size, device=self.device, amp_dtype=self.amp_dtype,
                log=self.log).to(self.device)
        if self.device.type == "cuda":  # the whole uint8 cache fits on the GPU: no host copies per step
            self.data.train = self.data.train.to(self.device)
        self.labels_np = data.train.labels.cpu().numpy()
        self.per_rank_batch = max(1, t.batch_size // self.dist.world_size)
        plan, _ = epoch_plan(self.labels_np, 0, cfg.seed, cfg.data.sampler, cfg.data.balance_target)
        self.steps_per_epoch = len(rank_batches(plan, np.zeros(plan.size, bool), self.per_rank_batch,
                                                0, self.dist.world_size))
        self.schedule = LRSchedule(o.lr, total_steps=t.epochs * self.steps_per_epoch,
                                   warmup_steps=int(round(o.warmup_epochs * self.steps_per_epoch)),
                                   kind=o.schedule, min_lr_ratio=o.min_lr_ratio)
        # --- progress state (everything a checkpoint must capture besides tensors) ---
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch completed
        self.global_step = 0
        self.acc = [0.0, 0.0, 0.0]  # this epoch so far, summed over ranks: loss*n, correct, n
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_macro_f1": None, "epoch": None}
        self.finished = False

    # ------------------------------------------------------------------ helpers

    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def _load_init(self, model: nn.Module, path: str) -> None:
        source, info = load_model_dir(path)
        if tuple(info.class_names) != self.class_names:
            raise ValueError(f"{path}: model classes {list(info.class_names)} differ from the data's "
                             f"{list(self.class_names)}")
        theirs, ours = source.config, model.config
        if (theirs.name, theirs.embed_dim, theirs.depth, theirs.patch_size, theirs.conv_stem) != (
                ours.name, ours.embed_dim, ours.depth, ours.patch_size, ours.conv_stem):
            raise ValueError(f"{path}: holds a {theirs.name} (conv_stem={theirs.conv_stem}) but the config "
                             f"asks for {ours.name} (conv_stem={ours.conv_stem}); set model.name to match")
        model.load_canonical_state_dict(source.canonical_state_dict())
        self.log(f"initialised from {path} (trained {info.metadata.get('epochs_trained', '?')} epoch(s))")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def preprocessing(self, temperature: float = 1.0) -> dict:
        prep = {"image_size": self.cfg.model.image_size, "pad_fill": self.data.pad_fill,
                "mean": [float(v) for v in self.data.mean], "std": [float(v) for v in self.data.std],
                "temperature": float(temperature)}
        if self.data.canonical:
            prep["canonical"] = dict(self.data.canonical)
        return prep

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict_logits(self, split: SplitTensors, model: nn.Module | None = None,
                       sharded: bool = True, features: bool = False) -> torch.Tensor:
        """Logits (N, C) float32 on CPU for a split, in order (sharded over ranks if active).
        With ``features=True``: the final-normed [CLS] features (N, D) instead."""
        model = model or self.eval_model
        forward = model.forward_features if features else model
        was_training = model.training
        model.eval()
        n = len(split)
        if sharded and self.dist.active:
            chunk = -(-n // self.dist.world_size)
            lo, hi = min(n, self.dist.rank * chunk), min(n, (self.dist.rank + 1) * chunk)
        else:
            lo, hi = 0, n
        outs = []
        bs = self.cfg.eval.batch_size
        for start in range(lo, hi, bs):
            x = split.images[start:min(hi, start + bs)].to(self.device, non_blocking=True)
            with self._autocast():
                outs.append(forward(self.eval_pre(x)).float())
        width = model.config.embed_dim if features else len(self.class_names)
        local = torch.cat(outs) if outs else torch.zeros(0, width, device=self.device)
        if sharded and self.dist.active:
            local = gather_rows(local, n)
        model.train(was_training)
        return local.cpu()

    def _validate(self) -> dict:
        logits = self.predict_logits(self.data.val)
        labels = self.data.val.labels.cpu()
        probs = torch.softmax(logits.double(), dim=1)
        metrics = compute_metrics(labels.numpy(), probs.numpy(), self.class_names)
        metrics["loss"] = float(F.cross_entropy(logits.double(), labels))
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt_tensors, self._opt_json = ckpt.optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        return tensors

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        tensors = self.state_tensors()
        meta = {
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
            "world_size": self.dist.world_size, "acc": self.acc, "history": self.history,
            "best": self.best, "finished": self.finished, "optimizer": self._opt_json,
            "rng": ckpt.rng_state(), "config": config_to_dict(self.cfg), "init_from": self.init_from,
            "lr": self.schedule(max(0, self.global_step - 1)), "saved_at": time.time(),
        }
        ckpt.save_checkpoint(self.run_dir / "checkpoints", f"step-{self.global_step:08d}", tensors, meta,
                             keep_last=self.cfg.checkpoint.keep_last)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (on every rank)."""
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            self.ema.load_state_dict(ema if ema else self.model.state_dict())
        ckpt.load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.epoch, self.batch_in_epoch = int(meta["epoch"]), int(meta["batch_in_epoch"])
        self.global_step = int(meta["global_step"])
        self.acc = [float(v) for v in meta["acc"]] if self.is_main else [0.0, 0.0, 0.0]
        self.history = list(meta["history"])
        self.best = dict(meta["best"])
        self.finished = bool(meta.get("finished", False))
        if meta.get("world_size", 1) != self.dist.world_size and self.batch_in_epoch:
            self.log(f"warning: checkpoint was written with {meta.get('world_size')} process(es), resuming "
                     f"with {self.dist.world_size}: the rest of this epoch's data order differs")
        ckpt.set_rng_state(meta["rng"])

    # ------------------------------------------------------------------ the loop

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor,
                    teacher: torch.Tensor | None = None) -> tuple[float, int]:
        x = self.augment(images, flags)
        targets = None
        if teacher is not None:
            targets = blend_targets(self.mixer.label_targets(labels), teacher, self.cfg.train.distill_weight)
        x, targets = self.mixer(x, labels, targets)
        lr = self.schedule(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            logits = self.train_model(x)
        loss = soft_cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.train.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.global_step)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {self.global_step} "
                                     f"(epoch {self.epoch + 1}); lower optim.lr or enable train.grad_clip")
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        return loss_value * labels.shape[0], correct

    def _epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        order, flags = epoch_plan(self.labels_np, epoch, cfg.seed, cfg.data.sampler, cfg.data.balance_target)
        batches = rank_batches(order, flags, self.per_rank_batch, self.dist.rank, self.dist.world_size)
        images, labels = self.data.train.images, self.data.train.labels
        local = [0.0, 0.0, 0.0]
        total_imgs = sum(len(b[0]) for b in batches)
        done_imgs = sum(len(b[0]) for b in batches[: self.batch_in_epoch])
        started = time.monotonic()
        self.train_model.train()
        every = cfg.checkpoint.every_steps
        with ProgressMeter(total_imgs, f"epoch {epoch + 1}/{cfg.train.epochs}", every_s=cfg.log.progress_every_s,
                           enabled=self.is_main, initial=done_imgs) as meter:
            for b in range(self.batch_in_epoch, len(batches)):
                idx, fl = batches[b]
                torch.manual_seed(step_seed(cfg.seed, epoch, b, self.dist.rank))
                sel = torch.from_numpy(idx).to(images.device)
                x = images.index_select(0, sel).to(self.device, non_blocking=True)
                y = labels.index_select(0, sel).to(self.device, non_blocking=True)
                teacher = None if self.teacher_probs is None else self.teacher_probs.index_select(
                    0, sel.to(self.teacher_probs.device))
                loss_sum, correct = self._train_step(x, y, torch.from_numpy(fl).to(self.device), teacher)
                local[0] += loss_sum
                local[1] += correct
                local[2] += len(idx)
                self.global_step += 1
                self.batch_in_epoch = b + 1
                meter.update(len(idx), loss=local[0] / local[2])
                if every and self.global_step % every == 0 and b + 1 < len(batches):
                    self._fold_accumulators(local)
                    self.save_checkpoint()
        self._fold_accumulators(local)
        seconds = time.monotonic() - started
        loss_sum, correct, seen = self.acc
        val = self._validate()
        record = {
            "epoch": epoch + 1, "global_step": self.global_step, "lr": self.schedule(self.global_step - 1),
            "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_images": int(seen),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_accuracy": val["macro_accuracy"],
            "val_macro_f1": val["macro_f1"], "val_ece": val["ece"],
            "val_group_accuracy": val.get("group", {}).get("accuracy"),
            "epoch_seconds": seconds, "train_images_per_s": (total_imgs - done_imgs) * self.dist.world_size / max(seconds, 1e-9),
        }
        self.history.append(record)
        improved = self.best["val_macro_f1"] is None or val["macro_f1"] > self.best["val_macro_f1"]
        if improved:
            self.best = {"val_macro_f1": val["macro_f1"], "epoch": epoch + 1, "val_accuracy": val["accuracy"]}
            self._export_best(val)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.acc = [0.0, 0.0, 0.0]
        self.save_checkpoint()
        self._write_history()
        self.log(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {record['train_loss']:.4f} "
                 f"acc {record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} "
                 f"acc {record['val_accuracy']:.4f} macro-F1 {record['val_macro_f1']:.4f}"
                 f"{' (best)' if improved else ''} | {record['train_images_per_s']:.1f} img/s, "
                 f"{format_seconds(seconds)}")

    def _fold_accumulators(self, local: list[float]) -> None:
        """Add this rank's partial-epoch sums (summed over ranks) into ``self.acc``."""
        summed = all_reduce_sum(local, self.device)
        self.acc = [a + s for a, s in zip(self.acc, summed)]
        local[:] = [0.0, 0.0, 0.0]

    def _export_best(self, val: dict) -> None:
        if not self.is_main:
            return
        metadata = {
            "run": str(self.run_dir), "epoch": self.epoch + 1, "epochs_trained": self.epoch + 1,
            "global_step": self.global_step, "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
            "ema": self.ema is not None, "init_from": self.init_from, "data": self.data.info,
            "training_config": config_to_dict(self.cfg),
        }
        save_model_dir(self.eval_model, self.run_dir / "model", self.class_names, self.preprocessing(), metadata)

    def _write_history(self) -> None:
        if not self.is_main:
            return
        write_json(self.run_dir / "history.json", self.history)
        plot_history(self.history, self.run_dir / "plots")

    def fit(self) -> list[dict]:
        """Train the remaining epochs, then calibrate and report. Returns the history."""
        cfg = self.cfg
        self.log(f"training {cfg.model.name} on {self.device} ({'bf16 autocast' if self.amp_dtype else 'fp32'}), "
                 f"{len(self.data.train)} train / {len(self.data.val)} val images, "
                 f"{self.steps_per_epoch} steps per epoch, {self.dist.world_size} process(es); run: {self.run_dir}")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_history()
        last = min(cfg.train.epochs, cfg.train.stop_after or cfg.train.epochs)
        ran = self.epoch < last
        while self.epoch < last:
            self._epoch()
        if ran or not self.finished:
            self.finish()
        return self.history

    # ------------------------------------------------------------------ after training

    def finish(self) -> dict | None:
        """Fit the temperature on validation, evaluate the best model on test, write reports."""
        barrier()
        result = None
        if self.is_main:
            result = self._final_report()
        self.finished = True
        self.save_checkpoint()
        barrier()
        return result

    def _fit_ood(self, model: nn.Module, model_dir: Path) -> dict:
        """Fit the unfamiliar-image detector on train features, threshold on validation."""
        from celluscan.evaluation.ood import OOD_VAL_FLAG_RATE, fit_detector, save_ood

        feats = {name: self.predict_logits(split, model, sharded=False, features=True)
                 for name, split in (("train", self.data.train), ("val", self.data.val))}
        stats = fit_detector(feats["train"], self.data.train.labels.cpu(), feats["val"], len(self.class_names))
        info = {"fitted_on": "train", "threshold_from": "val", "max_flag_rate": OOD_VAL_FLAG_RATE,
                "threshold": stats.threshold}
        save_ood(model_dir, stats, info)
        self.log(f"unfamiliar-image detector: Mahalanobis on [CLS] features, threshold {stats.threshold:.1f} "
                 f"flags {OOD_VAL_FLAG_RATE:.1%} of validation images")
        return info

    def _final_report(self) -> dict:
        model_dir = self.run_dir / "model"
        best, info = load_model_dir(model_dir, map_location=self.device)
        best.set_attention_path_for(self.amp_dtype or torch.float32, self.device)
        val_logits = self.predict_logits(self.data.val, best, sharded=False)
        val_labels = self.data.val.labels.cpu()
        temperature = 1.0
        if self.cfg.eval.fit_temperature:
            temperature = fit_temperature(val_logits, val_labels)
        before = apply_temperature(val_logits, 1.0).numpy()
        after = apply_temperature(val_logits, temperature).numpy()
        val_before = compute_metrics(val_labels.numpy(), before, self.class_names)
        val_after = compute_metrics(val_labels.numpy(), after, self.class_names)
        calibration = {"temperature": temperature, "fitted_on": "val", "val_ece_before": val_before["ece"],
                       "val_ece_after": val_after["ece"], "val_nll_before": val_before["nll"],
                       "val_nll_after": val_after["nll"]}
        update_model_dir(model_dir, preprocessing={"temperature": temperature},
                         metadata={"calibration": calibration})
        plot_reliability(reliability_bins(val_labels.numpy(), before), self.run_dir / "plots" / "reliability_val.png",
                         ece=val_before["ece"], after=reliability_bins(val_labels.numpy(), after),
                         ece_after=val_after["ece"])
        summary: dict[str, Any] = {"best": self.best, "calibration": calibration, "val": val_after}
        if self.cfg.eval.fit_ood and len(self.data.train) and len(self.data.val):
            summary["ood"] = self._fit_ood(best, model_dir)
        self.log(f"temperature {temperature:.3f}: validation ECE {val_before['ece']:.4f} -> {val_after['ece']:.4f}")
        if self.cfg.eval.test_at_end and self.data.test is not None and len(self.data.test):
            test_logits = self.predict_logits(self.data.test, best, sharded=False)
            test_labels = self.data.test.labels.cpu().numpy()
            probs = apply_temperature(test_logits, temperature).numpy()
            test = compute_metrics(test_labels, probs, self.class_names)
            test["ece_uncalibrated"] = compute_metrics(
                test_labels, apply_temperature(test_logits, 1.0).numpy(), self.class_names)["ece"]
            summary["test"] = test
            write_report(self.run_dir / "test", test, reliability_bins(test_labels, probs),
                         title=f"Test split: best model (epoch {self.best['epoch']})",
                         plots_dir=self.run_dir / "plots")
            update_model_dir(model_dir, metadata={"test_accuracy": test["accuracy"],
                                                  "test_macro_f1": test["macro_f1"]})
            self.log(f"test: accuracy {test['accuracy']:.4f}, macro accuracy {test['macro_accuracy']:.4f}, "
                     f"macro-F1 {test['macro_f1']:.4f}, ECE {test['ece']:.4f}")
        write_json(self.run_dir / "metrics.json", summary)
        atomic_write_text(self.run_dir / "DONE", f"best epoch {self.best['epoch']}\n")
        return summary
