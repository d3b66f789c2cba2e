"""Temperature scaling fixes a deliberately over-confident toy classifier."""

from __future__ import annotations

import io

import torch

from celluscan.evaluation.calibration import apply_temperature, fit_temperature
from celluscan.evaluation.metrics import expected_calibration_error
from celluscan.evaluation.progress import ProgressMeter


def test_temperature_reduces_ece_of_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    n, c = 2000, 6
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), labels] += 1.2  # ~60% accurate ...
    logits *= 5.0  # ... but with ~99% confidence
    t = fit_temperature(logits[:1000], labels[:1000])  # fit on one half, measure on the other
    assert 3.0 < t < 7.0
    before = expected_calibration_error(labels[1000:], apply_temperature(logits[1000:], 1.0))
    after = expected_calibration_error(labels[1000:], apply_temperature(logits[1000:], t))
    assert before > 0.25 and after < 0.05
    # Temperature never changes the predicted class.
    assert torch.equal(apply_temperature(logits, t).argmax(1), logits.argmax(1))


def test_underconfident_model_gets_temperature_below_one():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (800,), generator=g)
    logits = torch.randn(800, 4, generator=g) * 0.1
    logits[torch.arange(800), labels] += 0.5
    assert fit_temperature(logits, labels) < 0.5


def test_progress_meter_prints_rate_and_eta_when_not_a_tty():
    stream = io.StringIO()
    with ProgressMeter(100, "evaluate", every_s=0.0, stream=stream) as meter:
        meter.update(40, loss=1.5)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("evaluate: 40/100 img (40%)") and "img/s, ETA" in lines[0] and "loss=1.5" in lines[0]
