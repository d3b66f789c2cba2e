# %% [markdown]
# # CelluScan tutorial: from image folders to an explained prediction
#
# A plain Python script in `# %%` cells (VS Code, PyCharm and Jupytext open it as a notebook;
# `python tutorial/tutorial.py --out DIR` runs it top to bottom). It walks through the whole
# package on the 42 sample images bundled with CelluScan (3 per class) and a tiny model:
#
# 1. ingest the image folders into a split dataset (`celluscan.data.ingest`);
# 2. take the Vision Transformer apart step by step and print every tensor's shape;
# 3. train it for a couple of epochs (`celluscan.training.engine.Trainer`);
# 4. evaluate it (`celluscan.evaluation`), with confusion-matrix and reliability plots;
# 5. predict a few images (`celluscan.inference.Predictor`);
# 6. explain one prediction with attention rollout (`celluscan.inference.explain`).
#
# Everything it writes goes under `--out` (default `out/tutorial`). It takes about a minute
# on a busy 2-core CPU. The numbers it prints mean nothing about accuracy: 14 training images
# and a 24k-parameter model at 32 px are for seeing the mechanics, not for diagnosing cells.
# The background for each step is in docs/data.md and docs/architecture.md.

# %%
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from celluscan.data.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from celluscan.data.imageio import load_image  # noqa: E402
from celluscan.taxonomy import CLASSES, TAXONOMY  # noqa: E402

parser = argparse.ArgumentParser(description="Run the CelluScan tutorial end to end.")
parser.add_argument("--out", type=Path, default=Path("out/tutorial"), help="output folder (default out/tutorial)")
parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
args, _unknown = parser.parse_known_args()  # tolerate a notebook kernel's own arguments

OUT = args.out.resolve()
OUT.mkdir(parents=True, exist_ok=True)
SAMPLES = Path(str(resources.files("celluscan") / "assets" / "samples"))
torch.manual_seed(0)
started = time.monotonic()


def shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def step(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def save_figure(fig, name: str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = atomic_write_bytes(OUT / name, buf.getvalue())
    print(f"wrote {path}")
    return path


print(f"outputs go to {OUT}")

# %% [markdown]
# ## 1. The images
#
# `src/celluscan/assets/samples/` holds one folder per class, three JPEGs each, copied from
# the training data (`ATTRIBUTION.md` there lists the sources). One image per class:

# %%
step("1. the sample images")
sample_files = sorted(SAMPLES.rglob("*.jpg"))
per_class = Counter(p.parent.name for p in sample_files)
print(f"{len(sample_files)} images in {len(per_class)} class folders: {dict(per_class)}")

fig, axes = plt.subplots(2, 7, figsize=(14, 4.6))
for ax, class_id in zip(axes.flat, CLASSES):
    first = sorted((SAMPLES / class_id).glob("*.jpg"))[0]
    img = load_image(first)
    ax.imshow(img)
    ax.set_title(f"{TAXONOMY.cls(class_id).name}\n{img.width}x{img.height}", fontsize=8)
    ax.axis("off")
save_figure(fig, "samples.png")

# %% [markdown]
# ## 2. Ingest: folders -> verified, de-duplicated, split dataset
#
# `ingest` decodes every file safely, hashes it (sha256 for exact duplicates, a 64-bit DCT
# perceptual hash for near-duplicates), keeps near-duplicate groups inside one split, splits
# stratified by class and writes `manifest.csv`, `stats.json` (mean/std of the *training*
# split only) and preprocessed copies. With 3 images per class we split 1/1/1 so that every
# split has every class. The command-line equivalent is
# `celluscan ingest src/celluscan/assets/samples --out DATASET --fractions 0.34,0.33,0.33`.

# %%
step("2. ingest")
from celluscan.data.datasets import read_manifest  # noqa: E402
from celluscan.data.ingest import IngestConfig, ingest  # noqa: E402
from celluscan.data.stats import read_stats  # noqa: E402

DATASET = OUT / "dataset"
result = ingest(IngestConfig(sources=(str(SAMPLES),), out=str(DATASET), image_size=64,
                             fractions=(1 / 3, 1 / 3, 1 / 3), workers=1),
                log=lambda msg: print(msg, flush=True))
rows = read_manifest(DATASET / "manifest.csv")
print("splits:", dict(Counter(r.split for r in rows)))
print("first manifest row:", rows[0])
stats = read_stats(DATASET)
print(f"stats.json (train split only): mean {np.round(stats['mean'], 3).tolist()}, "
      f"std {np.round(stats['std'], 3).tolist()}")
# The shortcut check of docs/data.md: original image sizes per class.
sizes = Counter((r.label, f"{r.width}x{r.height}") for r in rows)
for class_id in CLASSES:
    found = {size: n for (label, size), n in sizes.items() if label == class_id}
    print(f"  {class_id:22s} {found}")

# %% [markdown]
# ### Why split before augmenting
#
# The original CelluScan notebook wrote TrivialAugmentWide copies into the class folders and
# *then* split at random, so augmented copies of test images sat in the training set. Could the
# near-duplicate search have caught them afterwards? Only some: one random op at a random
# strength (a rotation, a shear, a strong colour change) moves the perceptual hash far from
# the original's. So CelluScan splits the originals first and augments training images only,
# on the fly, never writing copies to disk.

# %%
from celluscan.data.dedup import DEFAULT_NEAR_DUP_THRESHOLD, hamming_distance, perceptual_hash  # noqa: E402
from celluscan.data.transforms import TrivialAugmentEdgeFill  # noqa: E402

torch.manual_seed(0)
augment = TrivialAugmentEdgeFill()
distances = []
for path in sample_files:
    original = load_image(path)
    original_hash = perceptual_hash(original)
    distances += [hamming_distance(original_hash, perceptual_hash(augment(original))) for _ in range(5)]
distances_arr = np.array(distances)
caught = float((distances_arr <= DEFAULT_NEAR_DUP_THRESHOLD).mean())
print(f"TrivialAugmentWide copies: {len(distances)} ({len(sample_files)} images x 5); pHash distance to the "
      f"original: median {np.median(distances_arr):.0f} of 64 bits; within the near-duplicate threshold "
      f"({DEFAULT_NEAR_DUP_THRESHOLD}): {caught:.0%}, so {1 - caught:.0%} would pass as different images")

# %% [markdown]
# ## 3. The Vision Transformer, one step at a time
#
# `vit_test` is the smallest registered model: 32 px input, 8 px patches (a 4x4 grid of 16
# patches), width D = 32, 2 encoder blocks of 2 heads. We push one image through it by hand
# and check each step against the model's own forward pass.

# %%
step("3. the ViT step by step")
from celluscan.data.transforms import eval_transform, preprocess  # noqa: E402
from celluscan.models import create_model  # noqa: E402

torch.manual_seed(0)
model = create_model("vit_test").eval()
cfg = model.config
P, D, H = cfg.patch_size, cfg.embed_dim, cfg.num_heads
d = D // H
print(f"config: image {cfg.image_size} px, patch {P}, width D={D}, {cfg.depth} blocks, {H} heads of d={d}")

image = load_image(sorted((SAMPLES / "eosinophil").glob("*.jpg"))[0])
x = eval_transform(cfg.image_size, stats["mean"], stats["std"])(image).unsqueeze(0)
print(f"image {image.width}x{image.height} -> preprocess (square, resize, normalise) -> x {shape(x)}")

with torch.no_grad():
    patches = model.patch_embed(x)  # Conv2d with kernel = stride = P: one vector per patch
    print(f"patch embedding (B, D, H/P, W/P):     {shape(patches)}")
    tokens = patches.flatten(2).transpose(1, 2)
    print(f"patch tokens (B, N, D):               {shape(tokens)}")
    cls = model.cls_token.expand(tokens.shape[0], -1, -1)
    tokens = torch.cat([cls, tokens], dim=1)
    print(f"[CLS] + patch tokens (B, T, D):       {shape(tokens)}")
    tokens = tokens + model.pos_embed
    print(f"+ position embeddings {shape(model.pos_embed)}: {shape(tokens)}")

    # Block 0's attention, written out: Q, K, V, scores, softmax, weighted sum of V.
    block = model.blocks[0]
    h = block.norm1(tokens)
    B, T, _ = h.shape
    qkv = block.attn.qkv(h)
    print(f"qkv = Linear(D, 3D)(LayerNorm(x)):    {shape(qkv)}")
    q, k, v = qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    print(f"Q, K, V per head (B, heads, T, d):    {shape(q)} each")
    scores = q @ k.transpose(-2, -1) / d**0.5
    weights = scores.softmax(dim=-1)
    print(f"attention weights softmax(QK^T/sqrt(d)) (B, heads, T, T): {shape(weights)}; "
          f"rows sum to {weights.sum(-1).mean():.4f}")
    mixed = (weights @ v).transpose(1, 2).reshape(B, T, D)
    attn_out = block.attn.proj(mixed)
    print(f"heads merged and projected (B, T, D): {shape(attn_out)}")
    for fused in (False, True):
        block.attn.fused_attn = fused
        diff = (block.attn(h) - attn_out).abs().max()
        print(f"  matches the model's {'fused SDPA' if fused else 'explicit'} attention: max |diff| {diff:.1e}")
    tokens = tokens + attn_out
    tokens = tokens + block.mlp(block.norm2(tokens))
    print(f"after block 0 (residual attention + residual MLP): {shape(tokens)}")
    for later in model.blocks[1:]:
        tokens = later(tokens)
    features = model.norm(tokens)[:, 0]
    print(f"final LayerNorm, [CLS] token = features (B, D): {shape(features)}")
    logits = model.head(features)
    print(f"head -> logits (B, classes):          {shape(logits)}")
    print(f"  matches model(x): max |diff| {(model(x) - logits).abs().max():.1e}")
    maps = model.attention_maps(x)
    print(f"model.attention_maps(x): {len(maps)} layers of {shape(maps[0])}")

# The patch grid the model sees, drawn over the preprocessed image.
small = preprocess(image, cfg.image_size)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8, 4))
ax0.imshow(image)
ax0.set_title(f"original {image.width}x{image.height}")
ax1.imshow(small, extent=(0, cfg.image_size, cfg.image_size, 0))
for i in range(1, cfg.grid_size):
    ax1.axhline(i * P, color="yellow", lw=1)
    ax1.axvline(i * P, color="yellow", lw=1)
ax1.set_title(f"{cfg.image_size}x{cfg.image_size} input, {cfg.num_patches} patches of {P}x{P}")
for ax in (ax0, ax1):
    ax.axis("off")
save_figure(fig, "patches.png")

# %% [markdown]
# ## 4. Train
#
# The training engine reads the dataset folder, decodes every image once into a uint8 tensor
# cache, augments batches on the fly (`BatchAugment`) and trains with AdamW. After each epoch
# it validates, keeps the best model by validation macro-F1 in `RUN/model`, and at the end fits
# a softmax temperature on validation and reports the test split. The same run from the
# command line: `celluscan train --config CONFIG.yaml --out RUN`.

# %%
step("4. train")
from celluscan.training.config import config_from_dict  # noqa: E402
from celluscan.training.data_source import load_train_data  # noqa: E402
from celluscan.training.engine import Trainer  # noqa: E402

RUN = OUT / "run"
train_cfg = config_from_dict({
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": str(DATASET), "workers": 1},
    "model": {"name": "vit_test", "image_size": 32},
    "optim": {"lr": 2e-3},
    "train": {"epochs": args.epochs, "batch_size": 8, "threads": 1},
    "checkpoint": {"every_steps": 0, "keep_last": 1},
    "log": {"progress_every_s": 1000},
}, source="tutorial").validate()
data = load_train_data(DATASET, 32, workers=1)
print(f"tensor cache: train {shape(data.train.images)} uint8, val {shape(data.val.images)}, "
      f"test {shape(data.test.images)}")
if (RUN / "checkpoints").exists():  # a re-run of the tutorial starts training afresh
    import shutil

    shutil.rmtree(RUN)
trainer = Trainer(train_cfg, RUN, data, log=lambda msg: print(msg, flush=True))
history = trainer.fit()
for record in history:
    print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, val loss {record['val_loss']:.3f}, "
          f"val macro-F1 {record['val_macro_f1']:.3f}")
print("plots:", ", ".join(sorted(p.name for p in (RUN / "plots").glob("*.png"))))

# %% [markdown]
# ## 5. Evaluate
#
# Here through the public inference API: the `Predictor` loads the exported model directory,
# preprocesses the original test files exactly as `celluscan predict` does, and applies the
# fitted temperature. `compute_metrics` gives micro and macro accuracy, per-class
# precision/recall/F1, the confusion matrix and the calibration error; `write_report` writes
# `metrics.json`, `per_class.md` and the PNG plots.

# %%
step("5. evaluate on the test split")
from celluscan.evaluation.metrics import compute_metrics, reliability_bins  # noqa: E402
from celluscan.evaluation.report import write_report  # noqa: E402
from celluscan.inference import Predictor  # noqa: E402

predictor = Predictor.from_model_dir(RUN / "model", precision="fp32", workers=0)
test_rows = [r for r in rows if r.split == "test"]
probs, labels = [], []
for (path, prediction), row in zip(predictor.predict_paths([r.path for r in test_rows]), test_rows):
    if isinstance(prediction, Exception):
        print(f"skipped {path}: {prediction}")
        continue
    probs.append([prediction.probs[c] for c in CLASSES])
    labels.append(CLASSES.index(row.label))
probs_arr, labels_arr = np.array(probs), np.array(labels)
metrics = compute_metrics(labels_arr, probs_arr, CLASSES)
EVAL = OUT / "evaluation"
written = write_report(EVAL, metrics, reliability_bins(labels_arr, probs_arr), title="Tutorial: test split")
print(f"{metrics['n']} test images: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
      f"ECE {metrics['ece']:.3f} (chance accuracy is 1/14 = {1 / 14:.3f})")
print("wrote", ", ".join(p.name for p in written))

# %% [markdown]
# ## 6. Predict
#
# A `Prediction` carries the label, its temperature-scaled probability, the top 3, the lineage
# group, an "uncertain" flag (top probability under the threshold, or torn between two classes)
# and an "unfamiliar" score for images unlike the training data.

# %%
step("6. predict a few images")
few = [sorted((SAMPLES / c).glob("*.jpg"))[0] for c in ("basophil", "lymphocyte", "myeloblast")]
for path, prediction in predictor.predict_paths(few):
    top = ", ".join(f"{c} {p:.2f}" for c, p in prediction.top_k)
    print(f"{Path(path).parent.name}/{Path(path).name}: {prediction.label} ({prediction.confidence:.2f}); "
          f"top 3: {top}; uncertain: {prediction.uncertain}; unfamiliar score {prediction.unfamiliar_score:.2f}")

# %% [markdown]
# ## 7. Explain: attention rollout
#
# Rollout multiplies the layers' head-averaged attention matrices (each with the identity added
# for the residual connection and rows renormalised): the [CLS] row of the product says how
# much each patch fed the decision. The patch grid is upsampled to the image and overlaid.

# %%
step("7. explain one prediction")
from celluscan.inference.explain import attention_rollout, overlay_heatmap, rollout_grid  # noqa: E402

explain_path = sorted((SAMPLES / "eosinophil").glob("*.jpg"))[0]
explain_image = load_image(explain_path)
net = predictor.explanation_model()
x = predictor.to_batch([predictor.prepare(explain_image)])
with torch.inference_mode():
    maps = net.attention_maps(x)
relevance = attention_rollout(maps)
grid = rollout_grid(relevance)
print(f"attention maps: {len(maps)} x {shape(maps[0])} -> rollout [CLS]->patch relevance {shape(relevance)} "
      f"-> patch grid {shape(grid)}")
heatmap = predictor.explain(explain_image)
print(f"heatmap over the original image (H, W): {heatmap.shape}, values in [{heatmap.min():.2f}, {heatmap.max():.2f}]")
overlay = overlay_heatmap(explain_image, heatmap)
buf = io.BytesIO()
overlay.save(buf, format="PNG")
print(f"wrote {atomic_write_bytes(OUT / 'explain_overlay.png', buf.getvalue())}")
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].imshow(explain_image)
axes[0].set_title(f"{explain_path.parent.name}")
axes[1].imshow(grid[0].numpy(), cmap="inferno")
axes[1].set_title(f"rollout on the {cfg.grid_size}x{cfg.grid_size} patch grid")
axes[2].imshow(overlay)
axes[2].set_title("overlay")
for ax in axes:
    ax.axis("off")
save_figure(fig, "explain.png")

# %%
step("done")
summary = {"seconds": round(time.monotonic() - started, 1), "test_accuracy": metrics["accuracy"],
           "pngs": sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*.png"))}
atomic_write_text(OUT / "summary.json", json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.stdout.flush()
