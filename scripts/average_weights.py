"""Average the weights of several model directories (a "model soup") and calibrate the result.

    python scripts/average_weights.py OUT_DIR MODEL_DIR MODEL_DIR [...] --dataset datasets/blood-cells

Averaging only makes sense for fine-tunes of one starting point (same architecture, same
preprocessing): their weights lie in one basin, so the average is itself a working model. The
inputs must agree on architecture, class names and preprocessing (mean, std, canonical step),
or the script refuses. The average's temperature is refitted on the validation split (its logits
are not any input's), and its unfamiliar-image detector must be refitted too: run
``scripts/fit_ood.py OUT_DIR --dataset ...`` afterwards (this script says so). Session 9 measured
two such averages against their ingredients (MODEL_CARD.md, "soup B" and "soup C").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of floating-point tensors (in float32); other tensors must be equal."""
    if not state_dicts:
        raise ValueError("nothing to average")
    keys = set(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != keys:
            raise ValueError(f"model {i} has different weights: {sorted(set(sd) ^ keys)[:5]}")
    out = {}
    for key, first in state_dicts[0].items():
        if first.is_floating_point():
            out[key] = sum(sd[key].float() for sd in state_dicts) / len(state_dicts)
        else:
            if any(not torch.equal(sd[key], first) for sd in state_dicts[1:]):
                raise ValueError(f"non-float tensor {key!r} differs between models")
            out[key] = first
    return out


def _check_compatible(infos) -> None:
    first = infos[0]
    for info in infos[1:]:
        for what, a, b in (("architecture", info.config["architecture"]["config"], first.config["architecture"]["config"]),
                           ("class names", list(info.class_names), list(first.class_names))):
            if a != b:
                raise SystemExit(f"{info.path}: {what} differ from {first.path}'s; only fine-tunes of one "
                                 f"model can be averaged")
        for key in ("image_size", "mean", "std", "pad_fill", "canonical"):
            if info.preprocessing.get(key) != first.preprocessing.get(key):
                raise SystemExit(f"{info.path}: preprocessing {key!r} differs from {first.path}'s "
                                 f"({info.preprocessing.get(key)!r} vs {first.preprocessing.get(key)!r})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="model directory to write")
    ap.add_argument("models", type=Path, nargs="+", help="model directories to average (two or more)")
    ap.add_argument("--dataset", type=Path, required=True, help="ingested dataset whose validation split sets the temperature")
    ap.add_argument("--cache-size", type=int, default=160)
    args = ap.parse_args(argv)
    if len(args.models) < 2:
        ap.error("give at least two model directories")

    from celluscan.data.batch_augment import EvalPreprocess
    from celluscan.evaluation.calibration import fit_temperature
    from celluscan.models import load_model_dir
    from celluscan.models.model_dir import save_model_dir, update_model_dir
    from celluscan.training.data_source import load_train_data, run_on_cache

    loaded = [load_model_dir(m) for m in args.models]
    infos = [info for _, info in loaded]
    _check_compatible(infos)
    model, info = loaded[0]
    model.load_canonical_state_dict(average_state_dicts([m.canonical_state_dict() for m, _ in loaded]), strict=True)
    prep = {k: v for k, v in info.preprocessing.items() if k != "temperature"}
    save_model_dir(model, args.out, info.class_names, prep,
                   metadata={"weight_average_of": [str(m) for m in args.models]})

    data = load_train_data(args.dataset, args.cache_size, canonical=prep.get("canonical"))
    normalise = EvalPreprocess(prep["image_size"], prep["mean"], prep["std"])
    model.set_fused_attn(False)
    logits = run_on_cache(model, normalise, data.val.images)
    accuracy = float((logits.argmax(1) == data.val.labels).float().mean())
    temperature = fit_temperature(logits, data.val.labels)
    update_model_dir(args.out, preprocessing={"temperature": temperature},
                     metadata={"calibration": {"temperature": temperature, "fitted_on": "val"},
                               "val_accuracy": accuracy})
    print(f"{args.out}: average of {len(args.models)} models; validation accuracy {accuracy:.4f}, "
          f"temperature {temperature:.3f}")
    print(f"next: python scripts/fit_ood.py {args.out} --dataset {args.dataset} --predictor-threshold")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
