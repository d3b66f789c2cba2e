#!/usr/bin/env bash
# Run the model ablation (configs/ablation/*.yaml) on a lent GPU machine within a time budget and
# leave the results in $OUT: the log, every run's reports/plots (runs.tgz, no checkpoints) and
# bf16 weights of the shipped recipe's run plus the best other runs (<= 15 MB pieces).
#   bash scripts/device_ablation.sh BUDGET_MIN
# Needs datasets/blood-cells-160 (scripts/pack_dataset.py) beside the code. The same configs run
# on a CPU with `celluscan train --config ...`; the GPU only makes the whole table affordable.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
BUDGET=${1:-7}
ABL=/tmp/abl
DEV=auto
{
  date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, torchvision, PIL; from PIL import features; print('torch', torch.__version__, 'tv', torchvision.__version__, 'PIL', PIL.__version__, 'webp', features.check('webp'), 'cuda', torch.cuda.is_available())"
  python3 -c "from celluscan.training.data_source import load_train_data as l; d=l('datasets/blood-cells-160', 160, workers=16); print('cache ok', len(d.train), len(d.val), len(d.test))" || exit 3
  if ! timeout 150 python3 -m celluscan train --config configs/ablation/a3_ti128_stem_modern_robust.yaml --out /tmp/smoke \
      --set data.dataset=datasets/blood-cells-160 model.name=vit_test model.image_size=32 train.epochs=1 data.subset_fraction=0.05; then
    echo "CUDA smoke test failed: falling back to the CPU"; DEV=cpu
  fi
  python3 scripts/ablation.py configs/ablation/*.yaml --dataset datasets/blood-cells-160 --out $ABL \
      --budget-min "$BUDGET" --parallel 6 --probe --finish-reserve-s 50 --set device=$DEV
  date
} 2>&1 | tee "$OUT/log.txt"
python3 - "$ABL" "$OUT" <<'PY'
import json, sys, pathlib, torch
from celluscan.models import load_model_dir, save_model_dir
abl, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = json.loads((abl / "results.json").read_text())
rows = [r for r in rows if (abl / r["run"] / "model" / "model.safetensors").exists()]
rows.sort(key=lambda r: -(r["val_macro_f1"] or 0))
pick = [r["run"] for r in rows if r["run"].startswith("a3")] + [r["run"] for r in rows if not r["run"].startswith("a3")]
budget, files = 58e6, 0
for name in pick:
    model, info = load_model_dir(abl / name / "model")
    dst = pathlib.Path("/tmp/bf16") / name
    save_model_dir(model, dst, info.class_names, info.preprocessing, info.metadata, dtype=torch.bfloat16)
    size = (dst / "model.safetensors").stat().st_size
    pieces = -(-size // 15_000_000)
    if size > budget or files + pieces > 6:
        continue
    budget, files = budget - size, files + pieces
    data = (dst / "model.safetensors").read_bytes()
    for i in range(0, len(data), 15_000_000):
        (out / f"w_{name}.{i // 15_000_000}").write_bytes(data[i:i + 15_000_000])
    print("returned weights of", name, size)
PY
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=model.safetensors -C /tmp abl smoke bf16 2>/dev/null
ls -la "$OUT"
