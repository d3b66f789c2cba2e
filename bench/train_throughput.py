"""Training throughput: our training step against a plain fp32 torchvision ViT training loop.

Usage (repo root; niced, it keeps the cores busy for a few minutes)::

    nice .venv/bin/python bench/train_throughput.py                          # vit_b_16, vit_s_16, vit_ti_16
    nice .venv/bin/python bench/train_throughput.py --models vit_b_16 --batch-size 16 --steps 5
    .venv/bin/python bench/train_throughput.py --device cuda --batch-size 64   # on a GPU

For each size, in one process and on the same synthetic batch (random uint8 images, 224 px,
14 classes):

* baseline: ``torchvision.models.VisionTransformer`` of the same shape (``vit_b_16`` is exactly
  ``torchvision.models.vit_b_16``), fp32, AdamW, cross-entropy: forward, backward, step;
* ours: :class:`celluscan.training.engine.Trainer`'s own step (the code ``celluscan train``
  runs): bf16 autocast where supported, AdamW with fp32 master weights, once per attention
  kernel (``explicit`` / ``fused``), with augmentation switched off so both sides do the same
  work; plus the best kernel *with* the batched augmentation, as training really runs it.

Timed steps of all variants are interleaved (round-robin), so a change in machine load hits
every variant alike; each figure is the median over ``--steps`` timed steps after ``--warmup``
untimed ones (wall clock; the process CPU time per step is shown beside it, which is less
disturbed when other jobs share the cores). Ratios are baseline time / ours, measured in the same
run. Acceptance: ours >= 3x the fp32 torchvision baseline for vit_b_16 (wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # torchvision VisionTransformer arguments for each of our sizes
    "vit_b_16": dict(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_s_16": dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
    "vit_ti_16": dict(num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
}
TARGET = 3.0


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if "bf16" in f or "amx" in f or f == "avx512f")
                info[key.strip()] = value
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def baseline_step_fn(name: str, batch: torch.Tensor, labels: torch.Tensor, device: torch.device):
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=224, patch_size=16, num_classes=14, **SHAPES[name]).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-2)
    x = (batch.float() / 255.0 - 0.5) / 0.25

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss

    return step


def our_step_fn(name: str, batch: torch.Tensor, labels: torch.Tensor, device: torch.device, attention: str,
                augment: bool):
    from celluscan.training.config import config_from_dict
    from celluscan.training.data_source import SplitTensors, TrainData
    from celluscan.training.engine import Trainer

    cfg = config_from_dict({
        "device": str(device), "model": {"name": name, "image_size": 224},
        "train": {"batch_size": batch.shape[0], "attention": attention, "threads": torch.get_num_threads()},
        "data": {"augment": {"enabled": augment}},
    }).validate()
    split = SplitTensors(batch.cpu(), labels.cpu())
    data = TrainData(train=split, val=split, mean=[0.5] * 3, std=[0.25] * 3)
    trainer = Trainer(cfg, REPO / "runs" / "_bench_unused", data, log=lambda _m: None)
    trainer.train_model.train()
    flags = torch.zeros(batch.shape[0], dtype=torch.bool, device=device)
    x, y = batch.to(device), labels.to(device)

    def step():
        return trainer._train_step(x, y, flags)

    return step, trainer.amp_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, batch_size: int, warmup: int, steps: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 14, (batch_size,), generator=g).to(device)
    variants = {"baseline fp32 torchvision": baseline_step_fn(name, batch, labels, device)}
    amp = None
    for attention in ("explicit", "fused"):
        variants[f"ours {attention}"], amp = our_step_fn(name, batch, labels, device, attention, augment=False)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    _sync(device)
    for _ in range(steps):
        for key, fn in variants.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    best = min(("explicit", "fused"), key=lambda a: statistics.median(times[f"ours {a}"]))
    # The real training step: best kernel + batched augmentation (timed separately, fewer steps).
    aug_fn, _ = our_step_fn(name, batch, labels, device, best, augment=True)
    for _ in range(warmup):
        aug_fn()
    aug_key = f"ours {best} + augmentation"
    times[aug_key], cpu[aug_key] = [], []
    for _ in range(max(2, steps // 2)):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        aug_fn()
        _sync(device)
        times[aug_key].append(time.perf_counter() - t0)
        cpu[aug_key].append(time.process_time() - c0)
    base = statistics.median(times["baseline fp32 torchvision"])
    base_cpu = statistics.median(cpu["baseline fp32 torchvision"])
    rows = {}
    for key, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[key])
        rows[key] = {"median_s": med, "images_per_s": batch_size / med, "ratio": base / med, "steps": len(ts),
                     "median_cpu_s": med_cpu, "cpu_ratio": base_cpu / med_cpu}
    return {"model": name, "batch_size": batch_size, "autocast": str(amp), "best_attention": best, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_b_16,vit_s_16,vit_ti_16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    info = machine()
    print(json.dumps(info))
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    results = []
    for name in args.models.split(","):
        r = bench_model(name.strip(), args.batch_size, args.warmup, args.steps, device)
        results.append(r)
        print(f"\n{name} (batch {args.batch_size}, {device}, ours autocast {r['autocast']})")
        print(f"  {'variant':36s} {'wall s/step':>11s} {'img/s':>8s} {'vs baseline':>11s} "
              f"{'CPU s/step':>10s} {'vs baseline':>11s}")
        for key, v in r["variants"].items():
            print(f"  {key:36s} {v['median_s']:11.3f} {v['images_per_s']:8.2f} {v['ratio']:10.2f}x "
                  f"{v['median_cpu_s']:10.3f} {v['cpu_ratio']:10.2f}x")
        sys.stdout.flush()
    b = next((r for r in results if r["model"] == "vit_b_16"), None)
    if b is not None:
        ratio = b["variants"][f"ours {b['best_attention']}"]["ratio"]
        print(f"\nvit_b_16: ours {ratio:.2f}x the fp32 torchvision baseline (target >= {TARGET}x): "
              f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
