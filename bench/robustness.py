"""Robustness of the shipped model (issue 10): other labs, synthetic shifts, unfamiliar flag.

    python bench/robustness.py [--model DIR] [--out out/robustness]

Runs `celluscan robustness` with ../shared/data/external-dev (BCCD + Tecom; measured only,
never trained or fitted on) and the test split of datasets/blood-cells (created with
`celluscan ingest` if missing). The tables go to OUT/robustness.md (copied into the model card).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "blood-cells")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "robustness")
    ap.add_argument("--shift-images", type=int, default=600)
    args = ap.parse_args()
    external = SHARED / "external-dev"
    if not external.is_dir():
        print(f"needs {external} (the shared data): not found", file=sys.stderr)
        return 1
    if not (args.dataset / "manifest.csv").exists():
        subprocess.run([sys.executable, "-m", "celluscan", "ingest", str(SHARED / "blood-cells"),
                        str(SHARED / "blood-cells-extra"), "--out", str(args.dataset)], check=True)
    cmd = [sys.executable, "-m", "celluscan", "robustness", "--external", str(external),
           "--dataset", str(args.dataset), "--output-dir", str(args.out), "--shift-images", str(args.shift_images)]
    if args.model:
        cmd += ["--model", str(args.model)]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    raise SystemExit(main())
