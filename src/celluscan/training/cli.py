"""``celluscan train``: train from a YAML config; resumable; multi-process under torchrun.

Examples::

    celluscan train --config configs/stage1_sanity.yaml --out runs/stage1
    celluscan train --config configs/stage3_full.yaml --set optim.lr=1e-4 train.epochs=3
    celluscan train --resume runs/stage1                 # continue exactly where it stopped
    celluscan train --config configs/stage3_full.yaml --init-from runs/stage3/model \\
        --set train.epochs=5 --out runs/stage3-plus5     # "another 5 epochs"
    torchrun --nproc_per_node 2 -m celluscan train --config configs/stage2_tune.yaml --out runs/ddp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "train a model from a YAML config (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (see configs/ and training/config.py)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set optim.lr=1e-4 train.epochs=2")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint (its config is reused)")
    parser.add_argument("--init-from", type=Path, metavar="MODEL_DIR",
                        help="start from a trained model directory (fresh optimiser and schedule)")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", help="run directory (default runs/<config>-<time>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _error(msg: str) -> int:
    print(f"celluscan train: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from celluscan.training.config import ConfigError, apply_overrides, config_from_dict, dump_config, load_config

    resume_state = None
    try:
        if args.resume is not None:
            if args.config is not None or args.init_from is not None:
                return _error("--resume reuses the run's own config and weights; drop --config/--init-from")
            from celluscan.training.checkpoint import load_latest

            resume_state = load_latest(args.resume / "checkpoints")
            if resume_state is None:
                return _error(f"{args.resume}: no usable checkpoint in {args.resume / 'checkpoints'}")
            meta = resume_state[1]
            cfg = config_from_dict(meta["config"], f"{resume_state[2]}/state.json")
            if args.overrides:
                print(f"note: overriding the run's config: {' '.join(args.overrides)}", file=sys.stderr)
            apply_overrides(cfg, args.overrides)
            cfg.validate()
            run_dir = args.resume
        else:
            if args.config is None:
                return _error("give --config CONFIG.yaml (or --resume RUN_DIR)")
            cfg = load_config(args.config, args.overrides)
            run_dir = args.out or (Path(cfg.out) if cfg.out else None)
    except ConfigError as e:
        return _error(str(e))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    import torch

    from celluscan.training.distributed import barrier, init_distributed, shutdown

    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    ctx = init_distributed("cuda" if use_cuda else "cpu")
    try:
        if run_dir is None:
            if ctx.active:
                return _error("under torchrun give --out RUN_DIR (every process must agree on it)")
            run_dir = Path("runs") / f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(run_dir)
        if resume_state is None and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            return _error(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
        return _train(cfg, run_dir, ctx, resume_state, args.init_from, dump_config, barrier)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return _error(str(e))
    finally:
        shutdown()


def _train(cfg, run_dir: Path, ctx, resume_state, init_from, dump_config, barrier) -> int:
    from celluscan.data.atomic import atomic_write_text
    from celluscan.training.data_source import load_train_data
    from celluscan.training.engine import Trainer, weights_digest

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    if not ctx.is_main:
        barrier()  # rank 0 builds the tensor cache first; the others then load it
    data = load_train_data(cfg.data.dataset, cfg.data.cache_size or cfg.model.image_size,
                           subset_fraction=cfg.data.subset_fraction, seed=cfg.seed,
                           cache_dir=cfg.data.cache_dir, workers=cfg.data.workers,
                           canonical=cfg.data.canonical, colour_stage=cfg.data.colour_stage)
    if ctx.is_main:
        barrier()
    if resume_state is not None:
        init_from = resume_state[1].get("init_from")
    trainer = Trainer(cfg, run_dir, data, dist=ctx, init_from=None if resume_state else init_from)
    if resume_state is not None:
        tensors, meta, path = resume_state
        trainer.init_from = init_from
        trainer.restore(tensors, meta)
        trainer.log(f"resumed from {path} (epoch {trainer.epoch + 1}, batch {trainer.batch_in_epoch}, "
                    f"step {trainer.global_step})")
    trainer.fit()
    print(f"[rank {ctx.rank}] final weights sha256 {weights_digest(trainer.model)}", flush=True)
    if ctx.is_main:
        print(f"run: {run_dir}  best model: {run_dir / 'model'}  (epoch {trainer.best['epoch']}, "
              f"val macro-F1 {trainer.best['val_macro_f1']:.4f})", flush=True)
    return 0
