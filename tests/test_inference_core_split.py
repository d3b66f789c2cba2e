"""Sharing the cores between decoding and the model (inference.core_split, Predictor planning)."""

from __future__ import annotations

import pytest
import torch

from celluscan.inference import Predictor
from celluscan.inference.core_split import model_ms_on, plan_core_split
from celluscan.inference.predictor import PLAN_PROBE_IMAGES
from test_inference_support import make_model_dir, write_images


def test_model_time_interpolates_between_one_and_all_cores():
    assert model_ms_on(1, 8.0, 2.0, 4) == 8.0
    assert model_ms_on(4, 8.0, 2.0, 4) == 2.0
    middle = [model_ms_on(k, 8.0, 2.0, 4) for k in (2, 3)]
    assert 8.0 > middle[0] > middle[1] > 2.0
    # perfectly parallel model (8 ms on one core, 2 on four): t(2) = 4
    assert model_ms_on(2, 8.0, 2.0, 4) == pytest.approx(4.0)
    # a model that does not scale at all stays flat
    assert model_ms_on(2, 3.0, 3.0, 4) == pytest.approx(3.0)


def test_small_model_gets_its_own_core():
    # the shipped model on our 2-core machine: decode 3.5 ms, model 3.1 (2 cores) / 3.9 (1 core)
    plan = plan_core_split(2, decode_ms=3.5, model_ms_all=3.1, model_ms_one=3.9, shared_workers=2)
    assert (plan.mode, plan.decode_workers, plan.model_threads) == ("split", 1, 1)
    assert plan.estimated_ms_per_image == pytest.approx(3.9)


def test_big_model_keeps_every_core():
    # ViT-B/16: decode 4 ms, model 115 ms on 2 cores, 190 on one
    plan = plan_core_split(2, decode_ms=4.0, model_ms_all=115.0, model_ms_one=190.0, shared_workers=2)
    assert (plan.mode, plan.decode_workers, plan.model_threads) == ("shared", 2, 2)
    assert plan_core_split(2, 4.0, 115.0, None, 2).mode == "shared"  # one-core time not measured
    assert plan_core_split(1, 4.0, 3.0, 3.0, 2).mode == "shared"  # nothing to split


def test_a_close_call_stays_shared():
    # the shipped model with --tta flip: model 6.0 ms (2 cores) / 11.2 (1 core), decode 4 ms:
    # shared ~10, split ~11.2 (measured 10.8 s vs 12.2 s for 1,000 images)
    assert plan_core_split(2, 4.0, 6.0, 11.2, 2).mode == "shared"
    # split only 5% better than shared: not worth the risk of a wrong estimate
    assert plan_core_split(2, 4.0, 6.0, 9.5, 2).mode == "shared"


def test_many_cores_split_by_cost():
    # decode as expensive as the model on 4 cores: several decode cores pay off
    plan = plan_core_split(16, decode_ms=8.0, model_ms_all=1.0, model_ms_one=12.0, shared_workers=2)
    assert plan.mode == "split" and 1 < plan.decode_workers < 15
    assert plan.decode_workers + plan.model_threads == 16
    assert plan.estimated_ms_per_image < 9.0


def test_negative_costs_are_refused():
    with pytest.raises(ValueError):
        plan_core_split(2, -1.0, 3.0, 3.0, 2)


def test_planned_run_matches_fixed_workers_and_restores_threads(tmp_path):
    model_dir = make_model_dir(tmp_path / "m")
    paths = write_images(tmp_path / "imgs", PLAN_PROBE_IMAGES + 13, seed=3)
    paths.insert(2, tmp_path / "imgs" / "missing.png")  # an error inside the probe images
    threads = torch.get_num_threads()
    planned = Predictor.from_model_dir(model_dir, precision="fp32", batch_size=4)
    assert planned.workers is None
    got = list(planned.predict_paths(paths))
    assert planned.last_core_split is not None
    split = planned.last_core_split
    assert split.decode_workers >= 1 and 1 <= split.model_threads <= threads
    assert torch.get_num_threads() == threads
    fixed = Predictor.from_model_dir(model_dir, precision="fp32", batch_size=4, workers=0)
    want = list(fixed.predict_paths(paths))
    assert fixed.last_core_split is None
    assert [p for p, _ in got] == [p for p, _ in want] == paths
    for (_, a), (_, b) in zip(got, want):
        assert type(a) is type(b)
        if not isinstance(a, Exception):
            assert a.label == b.label and a.confidence == pytest.approx(b.confidence, abs=1e-6)


def test_few_images_are_not_planned(tmp_path):
    model_dir = make_model_dir(tmp_path / "m")
    paths = write_images(tmp_path / "imgs", PLAN_PROBE_IMAGES - 1)
    predictor = Predictor.from_model_dir(model_dir, precision="fp32")
    assert len(list(predictor.predict_paths(paths))) == len(paths)
    assert predictor.last_core_split is None
