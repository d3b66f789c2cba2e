"""Fit (or refit) the unfamiliar-image detector of a trained model directory.

    python scripts/fit_ood.py MODEL_DIR --dataset datasets/blood-cells

`celluscan train` does this itself at the end of a run (eval.fit_ood); this script is for a
model directory trained without it. Features of the training split fit the detector, the
validation split sets the threshold (3.5% of its images flagged, under the 5% ceiling). External images are never used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--cache-size", type=int, default=160)
    ap.add_argument("--predictor-threshold", action="store_true",
                    help="set the threshold from validation images run through the predictor itself")
    args = ap.parse_args()

    from celluscan.data.batch_augment import EvalPreprocess
    from celluscan.evaluation.ood import OOD_VAL_FLAG_RATE, fit_detector, save_ood
    from celluscan.models import load_model_dir
    from celluscan.training.data_source import load_train_data, run_on_cache

    model, info = load_model_dir(args.model_dir)
    prep = info.preprocessing
    data = load_train_data(args.dataset, args.cache_size, canonical=prep.get("canonical"))
    pre = EvalPreprocess(prep["image_size"], prep["mean"], prep["std"])
    model.set_fused_attn(False)

    def features(split):
        return run_on_cache(model.forward_features, pre, split.images, amp_dtype=torch.bfloat16)

    stats = fit_detector(features(data.train), data.train.labels, features(data.val), len(info.class_names))
    save_ood(args.model_dir, stats, {"fitted_on": "train", "threshold_from": "val",
                                     "max_flag_rate": OOD_VAL_FLAG_RATE})
    if args.predictor_threshold:
        # Re-set the threshold from the validation images as the predictor sees them (decoded from
        # the original files and preprocessed once), so the flag rate holds for the real inference
        # path. The predictor scores with the detector just saved; only the threshold changes.
        from celluscan.data.datasets import read_manifest
        from celluscan.data.imageio import load_image
        from celluscan.evaluation.ood import choose_threshold
        from celluscan.inference.predictor import Predictor

        rows = [r for r in read_manifest(args.dataset / "manifest.csv") if r.split == "val"]
        predictor = Predictor.from_model_dir(args.model_dir)
        scores = [p.unfamiliar_score for p in predictor.predict_images([load_image(r.path) for r in rows])]
        stats.threshold = choose_threshold(torch.tensor(scores), OOD_VAL_FLAG_RATE)
        save_ood(args.model_dir, stats, {"fitted_on": "train", "threshold_from": "val (predictor path)",
                                         "max_flag_rate": OOD_VAL_FLAG_RATE})
    print(f"{args.model_dir}: unfamiliar threshold {stats.threshold:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
