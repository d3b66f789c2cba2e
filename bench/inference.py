"""Benchmark inference: throughput of every execution path against torchvision's ViT-B/16.

Usage (from the repo root; run it niced, it keeps both cores busy for ~10 minutes)::

    nice .venv/bin/python bench/inference.py                    # throughput, batches 1/8/32
    nice .venv/bin/python bench/inference.py --quick            # batches 1 and 8, fewer repeats
    nice .venv/bin/python bench/inference.py --e2e              # + `celluscan predict` on 1,000 JPEGs
    nice .venv/bin/python bench/inference.py --agreement ../shared/data/blood-cells   # every image
    nice .venv/bin/python bench/inference.py --profile          # top ops of the best path

What is measured, all in one run:

* the machine's matmul peak (``torch.matmul`` on 2048^2 and 4096^2 matrices, fp32 and bf16,
  the faster size), at the start and at the end of the run; the higher of the two is used
  (background load only lowers it);
* the baseline: stock ``torchvision.models.vit_b_16`` (random init), eager fp32;
* our ``vit_b_16`` on every path (fp32 eager, fp32 fused SDPA, bf16 explicit, bf16 fused,
  the bf16 paths traced + fused (``-jit``), ONNX Runtime fp32 and int8 (dynamic
  quantisation: check its agreement with ``--agreement``); with ``--bf16-weights`` also the
  whole model held in bf16, the design alternative), at batch 1, 8 and 32;
* the shipped default model, when present: fp32 eager vs the path ``auto`` picks.

Every (model, path, batch) runs in its own subprocess so no allocator or thread-pool state
is shared; at each batch size the baseline runs first and again last (its figure is the mean)
so a drift in background load does not favour one side. Throughput is the median over
``--repeats`` timed samples after warm-up (a sample repeats a call shorter than
:data:`MIN_SAMPLE_S` until it lasts that long); ratios are against the baseline at the same
batch size, measured in the same run. Achieved GFLOP/s counts 2 FLOPs per multiply-add
(``celluscan.models.summary.count_flops``).

``--agreement DIR`` classifies every image under DIR (or a class-stratified sample of
``--limit``) with every fast path and reports top-1 agreement with fp32 eager (target >= 99.5%)
and the number of images whose answer changed. Use all images for the reported figure: a
700-image sample moves by +-0.2 points (one image is 0.14 points).
``--e2e`` times ``celluscan predict`` over a folder of 1,000 generated ~360 px JPEGs (random
crops of the bundled samples) against the pure model time for the same count (target <= 1.5x),
for the shipped model and for ViT-B/16: wall time of the whole command (process start-up,
imports, model load included) and the time of its decode + classify loop alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "celluscan" / "assets" / "samples"
OUR_PATHS = ("fp32-eager", "fp32-fused", "bf16-explicit", "bf16-fused", "bf16-explicit-jit",
             "bf16-fused-jit", "onnx-fp32", "onnx-int8")
BF16_WEIGHTS_PATHS = ("bf16w-explicit", "bf16w-fused")  # --bf16-weights: the design alternative
DEFAULT_PATHS = ("fp32-eager", "auto", "bf16-explicit-jit", "onnx-fp32", "onnx-int8")  # the shipped model
FAST_PATHS = ("fp32-fused", "bf16-explicit", "bf16-fused", "bf16-explicit-jit", "bf16-fused-jit",
              "onnx-fp32", "onnx-int8")
TARGET_SPEEDUP, TARGET_PEAK, TARGET_E2E, TARGET_AGREEMENT = 3.5, 0.70, 1.5, 0.995
TARGET_DEFAULT_SPEEDUP = 3.0  # the shipped model's best path vs its own fp32 eager


# ================================================================================================
# Worker side: one configuration per process
# ================================================================================================


MIN_SAMPLE_S = 0.25
"""Shortest timed sample: a call faster than this (the shipped ViT-Ti at batch 1 takes ~4-11 ms)
is repeated inside each sample, as ``timeit``'s autorange does, so that one sample is not one
scheduler tick's worth of noise."""


def _time_calls(fn, warmup: int, repeats: int, calls: int = 1) -> list[float]:
    """Seconds per call of ``repeats`` samples, each timing ``calls`` calls in a row."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return times


def calls_per_sample(fn, min_sample_s: float = MIN_SAMPLE_S) -> int:
    """How many calls of ``fn`` (already warm) make a sample of at least ``min_sample_s``."""
    one = _time_calls(fn, warmup=0, repeats=1)[0]
    return max(1, math.ceil(min_sample_s / max(one, 1e-6)))


def worker_matmul(spec: dict) -> dict:
    """Median GFLOP/s of torch.matmul on square matrices, the best size of ``sizes``."""
    import torch

    from celluscan.inference.backends import configure_threads

    configure_threads()
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in spec.get("sizes", (2048, 4096)):
            g = torch.Generator().manual_seed(0)
            a = torch.randn(n, n, generator=g).to(dtype)
            b = torch.randn(n, n, generator=g).to(dtype)
            times = _time_calls(lambda: torch.matmul(a, b), warmup=2, repeats=spec.get("repeats", 5))
            gflops = 2 * n**3 / statistics.median(times) / 1e9
            if gflops > out.get(name, 0.0):
                out[name], out[name + "_n"] = gflops, n
                out[name + "_best"] = 2 * n**3 / min(times) / 1e9
    return out


class _Bf16WeightsRunner:
    """The design alternative to the predictor's bf16 path: the whole model held in bf16
    (patch embedding, residual stream and head included). As fast, less faithful to fp32."""

    def __init__(self, model, fused: bool):
        import torch

        self.model = copy.deepcopy(model).eval().set_fused_attn(fused).to(torch.bfloat16)

    def __call__(self, x):
        import torch

        with torch.inference_mode():
            features = self.model.forward_features(x.to(torch.bfloat16))
            return self.model.head(features).float(), features.float()


def _build_runner(spec: dict):
    """(runner callable on a normalised batch, image size, FLOPs per image, path name)."""
    import torch

    from celluscan.inference.backends import ExecutionPath, OnnxRunner, TorchRunner
    from celluscan.models import create_model, get_config, load_model_dir
    from celluscan.models.summary import count_flops

    if spec["model"] == "torchvision":
        import torchvision

        model = torchvision.models.vit_b_16(weights=None, num_classes=14).eval()

        def run(x):
            with torch.inference_mode():
                return model(x)

        return run, 224, count_flops(get_config("vit_b_16")), "fp32-eager"
    path = spec["path"]
    if path == "auto":
        from celluscan.inference.predictor import Predictor

        predictor = Predictor.from_model_dir(spec["model_dir"], workers=0)
        model_config = load_model_dir(spec["model_dir"])[1].model_config
        return predictor.run, predictor.image_size, count_flops(model_config), predictor.path_name
    if path.startswith("onnx"):
        precision = path.split("-")[1]
        onnx = Path(spec["onnx"])
        runner = OnnxRunner(int8_path_for(onnx) if precision == "int8" else onnx, precision=precision)
        from celluscan.models import read_model_dir_info

        info = read_model_dir_info(spec["model_dir"])
        return runner, info.preprocessing["image_size"], count_flops(info.model_config), path
    if spec.get("model_dir"):
        model, info = load_model_dir(spec["model_dir"])
        size = info.preprocessing["image_size"]
    else:
        model, size = create_model("vit_b_16").eval(), 224
    flops = count_flops(model.config)
    if path.startswith("bf16w-"):
        return _Bf16WeightsRunner(model, path.endswith("fused")), size, flops, path
    return TorchRunner(model, ExecutionPath.parse(path)), size, flops, path


def worker_throughput(spec: dict) -> dict:
    import torch

    from celluscan.inference.backends import configure_threads

    configure_threads()
    start = time.perf_counter()
    runner, size, flops, path_name = _build_runner(spec)
    batch = spec["batch"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    _time_calls(lambda: runner(x), warmup=spec.get("warmup", 1), repeats=0)
    setup = time.perf_counter() - start  # model build (+ tracing) and warm-up calls
    calls = calls_per_sample(lambda: runner(x))
    times = _time_calls(lambda: runner(x), warmup=0, repeats=spec["repeats"], calls=calls)
    median = statistics.median(times)
    return {"img_s": batch / median, "img_s_best": batch / min(times), "batch_s_median": median,
            "times": times, "calls_per_sample": calls, "setup_s": setup, "gflop_per_img": flops / 1e9, "path_name": path_name,
            "loadavg": os.getloadavg()[0]}


def worker_profile(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from celluscan.inference.backends import configure_threads

    configure_threads()
    runner, size, _, path_name = _build_runner(spec)
    x = torch.randn(spec["batch"], 3, size, size)
    runner(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"path_name": path_name, "table": table}


WORKERS = {"matmul": worker_matmul, "throughput": worker_throughput, "profile": worker_profile}


# ================================================================================================
# Orchestrator
# ================================================================================================


def run_worker(kind: str, spec: dict, timeout: float = 900) -> dict:
    """Run one configuration in a fresh interpreter; returns its JSON result (or an error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    from celluscan.inference.backends import cpu_count, cpu_supports_bf16

    return {"cpu": model, "cores": cpu_count(), "torch": torch.__version__,
            "native_bf16": cpu_supports_bf16(), "python": platform.python_version()}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_models(tmp: Path, with_onnx: bool = True) -> tuple[Path, Path | None]:
    """A random-init vit_b_16 model directory (shared by every 'ours' config) + its ONNX
    exports (``model.onnx``, and ``model.int8.onnx`` beside it)."""
    import torch

    from celluscan.inference.export import export_onnx
    from celluscan.models import create_model, save_model_dir
    from celluscan.taxonomy import CLASSES

    torch.manual_seed(0)
    model_dir = tmp / "vit_b_16"
    save_model_dir(create_model("vit_b_16"), model_dir, CLASSES,
                   {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, {"bench": True})
    if not with_onnx:
        return model_dir, None
    onnx_path = model_dir / "model.onnx"
    log("exporting vit_b_16 to ONNX ...")
    log(export_onnx(model_dir, onnx_path).summary())
    log(export_onnx(model_dir, int8_path_for(onnx_path), int8=True).summary())
    return model_dir, onnx_path


def export_default(tmp: Path) -> Path | None:
    """ONNX exports (fp32 + int8) of the shipped model, for its ONNX paths."""
    from celluscan.inference.export import export_onnx

    default = default_model_dir()
    if default is None:
        return None
    onnx_path = tmp / "default" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    log("exporting the shipped model to ONNX ...")
    log(export_onnx(default, onnx_path).summary())
    log(export_onnx(default, int8_path_for(onnx_path), int8=True).summary())
    return onnx_path


def int8_path_for(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".int8.onnx")


def default_model_dir() -> Path | None:
    from celluscan.inference.predictor import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def repeats_for(batch: int, quick: bool, repeats: int | None) -> int:
    if repeats:
        return repeats
    return (3 if batch >= 32 else 5) if not quick else 3


def throughput_suite(args, model_dir: Path, onnx_path: Path, default_onnx: Path | None = None) -> list[dict]:
    batches = [1, 8] if args.quick else args.batch_sizes
    baseline = {"model": "torchvision", "path": "fp32-eager"}
    configs = [baseline]
    paths = OUR_PATHS + (BF16_WEIGHTS_PATHS if args.bf16_weights else ())
    configs += [{"model": "vit_b_16", "path": p, "model_dir": str(model_dir), "onnx": str(onnx_path)}
                for p in paths]
    if "vit_b_16" not in args.models:
        configs = [baseline]
    default = default_model_dir()
    if default is not None and "default" in args.models:
        configs += [{"model": "default", "path": p, "model_dir": str(default), "onnx": str(default_onnx)}
                    for p in DEFAULT_PATHS if default_onnx is not None or not p.startswith("onnx")]
    results = []
    for batch in batches:
        # the baseline runs first and again last at each batch size, so a drift in background
        # load affects it like the paths measured in between (its img/s: the mean of both)
        for cfg in [*configs, baseline]:
            warmup = 3 if cfg["path"].endswith("jit") else 2 if batch == 1 else 1  # jit: compile runs
            spec = {**cfg, "batch": batch, "repeats": repeats_for(batch, args.quick, args.repeats),
                    "warmup": warmup}
            res = run_worker("throughput", spec)
            row = {**cfg, "batch": batch, **res}
            results.append(row)
            if "error" in res:
                log(f"  {cfg['model']:<11} {cfg['path']:<24} b{batch:<3} ERROR {res['error']}")
            else:
                log(f"  {cfg['model']:<11} {res['path_name']:<24} b{batch:<3} {res['img_s']:7.2f} img/s "
                    f"(best {res['img_s_best']:.2f}, setup {res['setup_s']:.0f} s, load {res['loadavg']:.1f})")
    return results


def summarise(results: list[dict], peak: dict) -> tuple[str, dict]:
    """Markdown table + the target checks."""
    runs: dict[int, list[float]] = {}
    for r in results:
        if r["model"] == "torchvision" and "img_s" in r:
            runs.setdefault(r["batch"], []).append(r["img_s"])
    baseline = {b: statistics.mean(v) for b, v in runs.items()}
    default_eager = {r["batch"]: r["img_s"] for r in results
                     if r["model"] == "default" and r["path"] == "fp32-eager" and "img_s" in r}
    lines = ["| model | path | batch | img/s (median) | img/s (best) | x baseline (default: x own fp32) | GFLOP/s | % fp32 peak "
             "| % bf16 peak | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "img_s" not in r:
            lines.append(f"| {r['model']} | {r['path']} | {r['batch']} | error: {r['error']} | | | | | | |")
            continue
        gflops = r["img_s"] * r["gflop_per_img"]
        if r["model"] == "default":  # the shipped model: against its own fp32 eager at this batch
            ratio = r["img_s"] / default_eager[r["batch"]] if r["batch"] in default_eager else float("nan")
        else:
            ratio = r["img_s"] / baseline[r["batch"]] if r["batch"] in baseline else float("nan")
        lines.append(f"| {r['model']} | {r['path_name']} | {r['batch']} | {r['img_s']:.2f} | {r['img_s_best']:.2f} | "
                     f"{ratio:.2f} | {gflops:.0f} | {100 * gflops / peak['fp32']:.0f}% | "
                     f"{100 * gflops / peak['bf16']:.0f}% | {r['loadavg']:.1f} |")
    ours = [r for r in results if r["model"] == "vit_b_16" and "img_s" in r]
    checks: dict = {}
    shipped = [r for r in results if r["model"] == "default" and "img_s" in r]
    for b in sorted({r["batch"] for r in shipped}):
        eager = [r["img_s"] for r in shipped if r["batch"] == b and r["path"] == "fp32-eager"]
        others = [r for r in shipped if r["batch"] == b and r["path"] != "fp32-eager"]
        if eager and others:
            top = max(others, key=lambda r: r["img_s"])
            checks[f"default_speedup_batch_{b}"] = {"path": top["path_name"], "ratio": top["img_s"] / eager[0],
                                                    "target": TARGET_DEFAULT_SPEEDUP}
    if not (ours and baseline):
        return "\n".join(lines), checks
    bf16 = [r for r in ours if r["path_name"].startswith("bf16")]
    for name, rows in (("best_speedup", ours), ("best_speedup_bf16", bf16)):
        if rows:
            best = max(rows, key=lambda r: r["img_s"] / baseline.get(r["batch"], math.inf))
            checks[name] = {"path": best["path_name"], "batch": best["batch"],
                            "ratio": best["img_s"] / baseline[best["batch"]], "target": TARGET_SPEEDUP}
    if bf16:  # the peak target is a bf16 one: int8 paths run on other (VNNI) units
        top = max(bf16, key=lambda r: r["img_s"])
        checks["best_bf16_peak_fraction"] = {"path": top["path_name"], "batch": top["batch"],
                                             "fraction": top["img_s"] * top["gflop_per_img"] / peak["bf16"],
                                             "target": TARGET_PEAK}
    for b in sorted(baseline):
        at_b = [r for r in ours if r["batch"] == b]
        if at_b:
            fastest = max(at_b, key=lambda r: r["img_s"])
            checks[f"speedup_batch_{b}"] = {"path": fastest["path_name"], "ratio": fastest["img_s"] / baseline[b]}
    return "\n".join(lines), checks


def _label(row: dict) -> str:
    return row["path_name"] if row["model"] == "vit_b_16" else f"{row['model']}\n{row['path_name']}"


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "img_s" in r]
    batches = sorted({r["batch"] for r in rows})
    labels = []
    for r in rows:
        label = _label(r)
        if label not in labels:
            labels.append(label)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.5))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        values = []
        for label in labels:
            match = [r["img_s"] for r in rows if r["batch"] == b and _label(r) == label]
            values.append(statistics.mean(match) if match else 0)
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=f"batch {b}")
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("images / s (median)")
    ax.set_title("ViT-B/16 inference throughput on CPU (higher is better)")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---- end to end ---------------------------------------------------------------------------------


def make_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` ~360 px JPEGs: random crops / flips / turns of the bundled sample images."""
    from PIL import Image

    from celluscan.data.imageio import IMAGE_SUFFIXES, load_image

    sources = sorted(p for p in SAMPLES.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not sources:
        raise SystemExit(f"no sample images under {SAMPLES}")
    images = [load_image(p) for p in sources]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = images[i % len(images)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        side = rng.randint(340, 380)
        crop = crop.resize((side, int(side * ch / cw)), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.rotate(90 * rng.randint(0, 3), expand=True)
        crop.save(folder / f"cell_{i:04d}.jpg", quality=90)


def e2e(args, model_dir: Path, n: int = 1000, tta: str = "none") -> dict:
    """``celluscan predict`` over ``n`` JPEGs against the pure model time for ``n`` images
    (times the number of views with test-time augmentation)."""
    from celluscan.inference.predictor import Predictor
    from celluscan.inference.tta import views

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        folder = Path(tmp) / "jpegs"
        log(f"e2e: generating {n} JPEGs ...")
        make_jpegs(folder, n)
        path_name = Predictor.from_model_dir(model_dir, workers=0).path_name
        batch = 32
        spec = {"model": "e2e", "path": path_name, "model_dir": str(model_dir), "batch": batch,
                "repeats": 7, "warmup": 2}
        pure_before = run_worker("throughput", spec)
        cmd = [sys.executable, "-m", "celluscan", "predict", str(folder), "--model", str(model_dir),
               "--output", str(Path(tmp) / "preds.csv"), "--batch-size", str(batch), "--tta", tta]
        log(f"e2e: {' '.join(cmd[2:])}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-500:]}
        pure_after = run_worker("throughput", spec)  # before and after: the faster one is used
        passes = len(views(tta))
        pures = [p["batch_s_median"] * n * passes / batch for p in (pure_before, pure_after) if "error" not in p]
        if not pures:
            return {"error": pure_before.get("error")}
        pure_s = min(pures)
        rows = len((Path(tmp) / "preds.csv").read_text().splitlines()) - 1
    # predict's own summary line times its decode + classify loop, without process start-up
    loop = re.search(r"classified \d+ of \d+ image\(s\) in ([0-9.]+) s", proc.stderr)
    loop_s = float(loop.group(1)) if loop else float("nan")
    return {"images": n, "rows": rows, "path": path_name, "tta": tta, "predict_wall_s": wall, "predict_loop_s": loop_s,
            "pure_model_s": pure_s, "pure_model_s_runs": pures, "ratio": wall / pure_s,
            "loop_ratio": loop_s / pure_s, "target": TARGET_E2E, "model_dir": str(model_dir),
            "loadavg": os.getloadavg()}


# ---- agreement ----------------------------------------------------------------------------------


def stratified_sample(data_dir: Path, limit: int, seed: int = 0) -> list[Path]:
    from celluscan.inference.cli import collect_inputs

    files = collect_inputs([data_dir])
    if limit <= 0 or len(files) <= limit:
        return files
    by_folder: dict[Path, list[Path]] = {}
    for f in files:
        by_folder.setdefault(f.parent, []).append(f)
    rng = random.Random(seed)
    per = max(1, limit // len(by_folder))
    picked = [p for group in by_folder.values() for p in rng.sample(group, min(per, len(group)))]
    return sorted(picked)[:limit]


def agreement(data_dir: Path, model_dir: Path, limit: int, batch: int = 32) -> dict:
    """Top-1 agreement of every fast path with fp32 eager on the images under ``data_dir``."""
    import torch

    from celluscan.data.imageio import ImageLoadError
    from celluscan.inference.backends import ExecutionPath, OnnxRunner, TorchRunner, configure_threads
    from celluscan.inference.batching import ordered_map
    from celluscan.inference.predictor import Predictor
    from celluscan.models import load_model_dir

    configure_threads()
    files = stratified_sample(data_dir, limit)
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    arrays, labels = [], []
    for path, result in ordered_map(predictor.load_and_prepare, files, 2, 64, errors=(ImageLoadError,)):
        if not isinstance(result, ImageLoadError):
            arrays.append(result)
            labels.append(predictor.class_names.index(path.parent.name)
                          if path.parent.name in predictor.class_names else -1)
    labels_t = torch.tensor(labels)
    labelled = labels_t >= 0

    def accuracy(top: torch.Tensor) -> float | None:  # vs class-folder names, where they are classes
        return float((top[labelled] == labels_t[labelled]).float().mean()) if labelled.any() else None

    log(f"agreement: {len(arrays)} images from {data_dir} with {model_dir}")
    model, _ = load_model_dir(model_dir)

    def top1(runner) -> torch.Tensor:
        out = []
        for s in range(0, len(arrays), batch):
            out.append(runner(predictor.to_batch(arrays[s:s + batch]))[0].argmax(-1))
        return torch.cat(out)

    start = time.perf_counter()
    reference = top1(TorchRunner(model, ExecutionPath.parse("fp32-eager")))
    report = {"images": len(arrays), "data_dir": str(data_dir), "model_dir": str(model_dir),
              "reference": "fp32-eager", "reference_s": time.perf_counter() - start, "paths": {},
              "accuracy": {"fp32-eager": accuracy(reference)}}
    with tempfile.TemporaryDirectory(prefix="bench_agree_") as tmp:
        from celluscan.inference.export import export_onnx

        onnx_fp32 = Path(tmp) / "model.onnx"  # exported here: the model dir may have none
        export_onnx(model_dir, onnx_fp32, check_images=files[:16])
        export_onnx(model_dir, int8_path_for(onnx_fp32), int8=True, check_images=files[:16])
        for name in FAST_PATHS + ("bf16w-explicit",):  # + the design alternative, for the record
            if name.startswith("onnx"):
                precision = name.split("-")[1]
                runner = OnnxRunner(int8_path_for(onnx_fp32) if precision == "int8" else onnx_fp32,
                                    precision=precision)
            elif name.startswith("bf16w-"):
                runner = _Bf16WeightsRunner(model, name.endswith("fused"))
            else:
                runner = TorchRunner(model, ExecutionPath.parse(name))
            got = top1(runner)
            report["paths"][name] = float((got == reference).float().mean())
            report.setdefault("changed", {})[name] = int((got != reference).sum())
            report["accuracy"][name] = accuracy(got)
            log(f"  {name:<18} top-1 agreement {100 * report['paths'][name]:.2f}% "
                f"({report['changed'][name]} of {len(arrays)} answers changed)")
    report["target"] = TARGET_AGREEMENT
    report["auto_path"] = Predictor.from_model_dir(model_dir, workers=0).path_name
    return report


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="batches 1 and 8 only, 3 repeats")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--models", nargs="+", choices=["vit_b_16", "default"], default=["vit_b_16", "default"],
                    help="which throughput groups to run besides the torchvision baseline (and, with "
                         "--e2e, whether ViT-B/16 is timed end to end besides the chosen model)")
    ap.add_argument("--repeats", type=int, default=None, help="timed batches per config (default 5, 3 at batch 32)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput suite")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="also time the whole model held in bf16 (the design alternative)")
    ap.add_argument("--e2e", action="store_true", help="also time `celluscan predict` on 1,000 JPEGs")
    ap.add_argument("--e2e-images", type=int, default=1000)
    ap.add_argument("--agreement", type=Path, nargs="+", metavar="DATA_DIR",
                    help="top-1 agreement of fast paths with fp32 on the images under each DATA_DIR")
    ap.add_argument("--limit", type=int, default=0,
                    help="--agreement: a class-stratified sample of this many images (default 0 = all)")
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory for --e2e/--agreement (default: the shipped model, else random vit_b_16)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of the bf16 paths at batch 32")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "inference.json")
    ap.add_argument("--plot", type=lambda v: Path(v) if v else None,
                    default=REPO / "bench" / "results" / "inference.png",
                    help="PNG of the throughput table ('' for none)")
    args = ap.parse_args(argv)

    if args.worker:
        kind, spec = args.worker
        print(json.dumps(WORKERS[kind](json.loads(spec))))
        return 0

    results: dict = {"machine": machine(), "command": " ".join(["bench/inference.py", *sys.argv[1:]]),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg()}
    log(f"machine: {results['machine']}")

    def save() -> None:  # after every section, so a killed run keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        model_dir, onnx_path = prepare_models(Path(tmp), with_onnx=not args.no_throughput)
        if not args.no_throughput:
            peak_start = run_worker("matmul", {})
            log(f"matmul peak: fp32 {peak_start['fp32']:.0f} GFLOP/s, bf16 {peak_start['bf16']:.0f} GFLOP/s")
            default_onnx = export_default(Path(tmp)) if "default" in args.models else None
            rows = throughput_suite(args, model_dir, onnx_path, default_onnx)
            peak_end = run_worker("matmul", {})
            log(f"matmul peak (end): fp32 {peak_end['fp32']:.0f} GFLOP/s, bf16 {peak_end['bf16']:.0f} GFLOP/s")
            peak = {k: max(peak_start[k], peak_end[k]) for k in ("fp32", "bf16")}
            results["matmul_peak_gflops"] = {"start": peak_start, "end": peak_end, "used": peak}
            table, checks = summarise(rows, peak)
            print(f"matmul peak used: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
            results["throughput"], results["checks"] = rows, checks
            print("\n" + table + "\n")
            for key, value in checks.items():
                print(f"{key}: {json.dumps(value)}")
            save()
            if args.plot:
                plot(rows, args.plot)
                log(f"plot: {args.plot}")
        if args.profile:
            for path in ("bf16-fused", "bf16-explicit"):
                prof = run_worker("profile", {"model": "vit_b_16", "path": path, "model_dir": str(model_dir),
                                              "batch": 32})
                print(f"\nprofile {path} batch 32:\n{prof.get('table', prof.get('error'))}")
                results.setdefault("profile", {})[path] = prof.get("table")
                save()
        chosen = args.model or default_model_dir() or model_dir
        if args.e2e:  # the chosen (shipped) model, and ViT-B/16 when asked for and another model
            results["e2e"] = []
            e2e_models = [chosen, model_dir] if "vit_b_16" in args.models else [chosen]
            runs = [(m, "none") for m in dict.fromkeys(e2e_models)] + [(chosen, "flip")]
            for e2e_model, tta in runs:
                results["e2e"].append(e2e(args, e2e_model, args.e2e_images, tta))
                print(f"e2e: {json.dumps(results['e2e'][-1])}")
                save()
        if args.agreement:
            results["agreement"] = []
            for data_dir in args.agreement:
                results["agreement"].append(agreement(data_dir, chosen, args.limit))
                print(f"agreement: {json.dumps(results['agreement'][-1])}")
                save()
    results["loadavg_end"] = os.getloadavg()
    save()
    log(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
