"""How to share the CPU cores between image decoding and the model during a batch run.

Two ways to run ``celluscan predict`` on ``C`` cores:

* **shared**: phases (``batching.phased_map``): every decode thread works on the next batch
  while the model waits, then the model runs on all ``C`` cores while the decode threads wait.
  They never run at once because PyTorch's OpenMP threads busy-wait between kernels, so decode
  threads beside the model mostly steal its time: measured on our 2-core machine with the
  shipped model, decoding beside the model took *longer* than decoding and classifying one
  after the other (9.4 s vs 8.5 s for 1,000 images); phases took 6.5-7.0 s where decoding
  beside the model took 8.2-8.3 s (same run). Right for a model that costs far more than
  decoding (ViT-B/16: 100x), where the decode time hardly matters.
* **split**: ``d`` cores decode (one thread each) and the model runs on the other ``C - d``
  cores, each side on its own cores, so they overlap for real: the run takes about
  ``max(model time on C - d cores, decode time / d)``. Right for a small model whose cost per
  image is close to the decode cost (the shipped ViT-Tiny).

:func:`plan_core_split` picks the faster from measured per-image costs (the predictor measures
them on the run's first images, see ``Predictor.plan_cores``). The model's time on ``k``
cores is interpolated from its times on one and on all cores with Amdahl's law,
``t(k) = serial + parallel / k``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CoreSplit", "model_ms_on", "plan_core_split", "SKIP_SPLIT_RATIO", "SPLIT_MARGIN",
           "PHASED_DECODE_SPEEDUP"]

PHASED_DECODE_SPEEDUP = 1.25
"""How much faster several decode threads get through a batch than one: measured 1.27x for two
threads on our two cores (the Pillow steps run in parallel, the Python and small numpy steps of
nucleus framing hold the GIL)."""

SPLIT_MARGIN = 0.9
"""The split is chosen only when its estimate beats the shared plan's by 10%: the costs are
measured on a few images at a small batch, and near the boundary (the shipped model with
``--tta flip``: 12.2 s split vs 10.8 s shared for 1,000 images) the estimate can be wrong."""

SKIP_SPLIT_RATIO = 20.0
"""When the model on all cores costs this many times more per image than decoding, the
split cannot win by more than a few percent, so the one-core model timing is not worth
measuring (for ViT-B/16 it would cost seconds)."""


@dataclass(frozen=True)
class CoreSplit:
    """The plan: ``decode_workers`` threads decode, the model uses ``model_threads``."""

    mode: str
    """``"shared"`` or ``"split"``."""
    decode_workers: int
    model_threads: int
    estimated_ms_per_image: float
    reason: str

    def describe(self) -> str:
        return (f"{self.mode}: {self.decode_workers} decode thread(s), model on "
                f"{self.model_threads} core(s) ({self.reason})")


def model_ms_on(cores: int, ms_one: float, ms_all: float, total_cores: int) -> float:
    """The model's per-image time on ``cores`` cores, from its times on 1 and ``total_cores``
    (Amdahl's law through both points; never below the all-core time)."""
    if total_cores <= 1 or cores >= total_cores:
        return ms_all
    if cores <= 1:
        return ms_one
    parallel = max(0.0, (ms_one - ms_all) / (1.0 - 1.0 / total_cores))
    serial = max(0.0, ms_one - parallel)
    return max(ms_all, serial + parallel / cores)


def plan_core_split(cores: int, decode_ms: float, model_ms_all: float,
                    model_ms_one: float | None, shared_workers: int) -> CoreSplit:
    """Choose between the shared and split plans (module docstring) from measured costs.

    ``decode_ms``: reading + preprocessing one image on one core. ``model_ms_all`` /
    ``model_ms_one``: the model's time per image on all cores / on one (``None``: not
    measured, which rules the split out). ``shared_workers``: decode threads in shared mode.
    Estimates: shared = model + decode / :data:`PHASED_DECODE_SPEEDUP` (they take turns on the
    same cores, see the module docstring); split with ``d`` decode cores = max(model on ``cores - d``, decode / ``d``),
    chosen only below :data:`SPLIT_MARGIN` x the shared estimate.
    """
    if min(decode_ms, model_ms_all) < 0 or (model_ms_one is not None and model_ms_one < 0):
        raise ValueError("measured costs must be >= 0")
    reason = ("one core: nothing to split" if cores < 2 else
              "the model dominates" if model_ms_one is None else "estimated fastest")
    speedup = PHASED_DECODE_SPEEDUP if min(cores, shared_workers) > 1 else 1.0
    shared = CoreSplit("shared", max(1, shared_workers), cores, model_ms_all + decode_ms / speedup, reason)
    if cores < 2 or model_ms_one is None:
        return shared
    best, bar = shared, SPLIT_MARGIN * shared.estimated_ms_per_image
    for decode_cores in range(1, cores):
        model_ms = model_ms_on(cores - decode_cores, model_ms_one, model_ms_all, cores)
        estimate = max(model_ms, decode_ms / decode_cores)
        if estimate < min(bar, best.estimated_ms_per_image):
            best = CoreSplit("split", decode_cores, cores - decode_cores, estimate,
                             f"decode {decode_ms:.1f} ms/img, model {model_ms:.1f} ms/img "
                             f"on {cores - decode_cores} core(s)")
    return best
