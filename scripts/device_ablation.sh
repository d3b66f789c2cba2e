#!/usr/bin/env bash
# Run the model ablation (configs/ablation/*.yaml) on a lent GPU machine within a time budget and
# leave the results in $OUT: the log, every run's reports/plots (runs.tgz, no checkpoints) and
# bf16 weights of the shipped recipe's run plus the best other runs (<= 15 MB pieces).
#   bash scripts/device_ablation.sh BUDGET_MIN [CONFIG.yaml ...]   (default configs/ablation/*.yaml)
# Needs datasets/blood-cells-160 (scripts/pack_dataset.py) beside the code. The same configs run
# on a CPU with `celluscan train --config ...`; the GPU only makes the whole table affordable.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
BUDGET=${1:-7}
shift || true
CONFIGS=("$@"); [ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/ablation/*.yaml)
PARALLEL=${PARALLEL:-${#CONFIGS[@]}}; [ "$PARALLEL" -le 6 ] || PARALLEL=6
ABL=/tmp/abl
# the carried copy may come as one tar (many small files cost more of the transfer limit)
[ -d datasets/blood-cells-160 ] || [ ! -f datasets/blood-cells-160.tar ] || tar xf datasets/blood-cells-160.tar -C datasets
DEV=auto
{
  date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, torchvision, PIL; from PIL import features; print('torch', torch.__version__, 'tv', torchvision.__version__, 'PIL', PIL.__version__, 'webp', features.check('webp'), 'cuda', torch.cuda.is_available())"
  # build every config's tensor cache once with all cores, before the runs start in parallel
  python3 - "${CONFIGS[@]}" <<'PY' || exit 3
import sys
from celluscan.training.config import load_config
from celluscan.training.data_source import load_train_data
for path in sys.argv[1:]:
    cfg = load_config(path)
    d = load_train_data('datasets/blood-cells-160', cfg.data.cache_size or cfg.model.image_size, workers=16,
                        canonical=cfg.data.canonical, colour_stage=cfg.data.colour_stage)
    print('cache ok', path, len(d.train), len(d.val), len(d.test or ()), flush=True)
PY
  # SMOKE=0 skips the CUDA smoke test; PROBE=0 EPOCHS=N trains N epochs without the timing probe;
  # SETS='a.b=1 c=2' adds overrides for every run (eval.test_at_end=false for a copy without test images)
  if [ "${SMOKE:-1}" = 1 ] && ! timeout 150 python3 -m celluscan train --config "${CONFIGS[0]}" --out /tmp/smoke \
      --set data.dataset=datasets/blood-cells-160 model.name=vit_test model.image_size=32 train.epochs=1 data.subset_fraction=0.05; then
    echo "CUDA smoke test failed: falling back to the CPU"; DEV=cpu
  fi
  python3 scripts/ablation.py "${CONFIGS[@]}" --dataset datasets/blood-cells-160 --out $ABL \
      --budget-min "$BUDGET" --parallel "$PARALLEL" $([ "${PROBE:-1}" = 1 ] && echo --probe) \
      --finish-reserve-s 50 --set device=$DEV ${EPOCHS:+train.epochs=$EPOCHS} ${SETS:-}
  date
} 2>&1 | tee "$OUT/log.txt"
python3 - "$ABL" "$OUT" <<'PY'
import json, sys, pathlib, torch
from celluscan.models import load_model_dir, save_model_dir
abl, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = json.loads((abl / "results.json").read_text())
rows = [r for r in rows if (abl / r["run"] / "model" / "model.safetensors").exists()]
rows.sort(key=lambda r: -(r["val_macro_f1"] or 0))
pick = [r["run"] for r in rows]  # best validation macro-F1 first
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
