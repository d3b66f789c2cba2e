"""Batched training augmentation (data.batch_augment): the window step, colour casts, and the
canonical colour step run per batch with inference's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from celluscan.data.batch_augment import (
    AugmentConfig,
    BatchAugment,
    EvalPreprocess,
    background_fill,
    colour_batch,
    hue_rotation,
)
from celluscan.data.canonical import apply_colour, reinhard

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _cells(n: int = 4, size: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 (n,3,size,size): a pale yellowish background with a dark purple disc in the middle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, size, size)
    x[:, 0], x[:, 1], x[:, 2] = 0.92, 0.85, 0.70
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 5) ** 2
    x[:, :, disc] = torch.tensor([0.35, 0.20, 0.50])[None, :, None]
    x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def _only(**fields) -> AugmentConfig:
    """Everything off except ``fields``."""
    off = dict(rotate=False, hflip=0.0, vflip=0.0, zoom_range=(1.0, 1.0), translate=0.0, aspect=0.0,
               trivial_augment=False, brightness=0.0, contrast=0.0, saturation=0.0)
    return AugmentConfig(**{**off, **fields})


def _denorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _augment(images: torch.Tensor, seed: int, **fields) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, augmented) as 0-1 floats, with only ``fields`` switched on."""
    aug = BatchAugment(_only(**fields), images.shape[-1], MEAN, STD)
    torch.manual_seed(seed)
    return images.float() / 255, _denorm(aug(images))


def test_colour_batch_is_inference_reinhard_image_by_image():
    images = _cells(3)
    images[1] = (images[1].float() * torch.tensor([1.0, 0.8, 0.5]).view(3, 1, 1)).to(torch.uint8)  # a cast
    x = images.float() / 255
    out = colour_batch(x, "reinhard")
    for i in range(3):
        one = reinhard(x[i].permute(1, 2, 0).double().numpy())
        assert np.abs(out[i].permute(1, 2, 0).numpy() - one).max() < 1e-4
    assert torch.equal(colour_batch(x, "none"), x)
    with pytest.raises(ValueError, match="grey"):
        colour_batch(x, "grey")


def test_eval_preprocess_with_colour_matches_the_predictor_path():
    """A cache stored without its colour step, normalised per batch, gives the model what
    inference's PIL path (resize, then canonical colour) gives it, to uint8 rounding."""
    images = _cells(2, size=64)
    pre = EvalPreprocess(32, MEAN, STD, colour="reinhard")
    got = _denorm(pre(images))
    for i in range(2):
        # Pillow's antialiased bicubic and torch's differ slightly: resize with torch, colour with PIL.
        small = EvalPreprocess(32, (0, 0, 0), (1, 1, 1))(images[i:i + 1])[0]
        img = Image.fromarray((small.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
        want = np.asarray(apply_colour(img, "reinhard"), dtype=np.float32) / 255
        assert np.abs(got[i].permute(1, 2, 0).numpy() - want).max() < 3 / 255
    plain = _denorm(EvalPreprocess(32, MEAN, STD)(images))
    assert (got - plain).abs().max() > 0.05  # the colour step did something


def test_augment_runs_the_colour_step_last():
    """Whatever cast augmentation adds before it, the batched Reinhard step maps each image's
    CIELAB statistics onto the reference, as inference does."""
    from celluscan.data.canonical import REINHARD_REFERENCE, rgb_to_lab

    aug = BatchAugment(_only(channel_gain=0.3, brightness=0.3), 48, MEAN, STD, colour="reinhard")
    out = _denorm(aug(_cells(4)))
    lab = rgb_to_lab(out.permute(0, 2, 3, 1).double().numpy()).reshape(4, -1, 3)
    assert np.allclose(lab.mean(1), np.array(REINHARD_REFERENCE[0])[None], atol=2.5)
    with pytest.raises(ValueError, match="colour"):
        BatchAugment(_only(), 48, MEAN, STD, colour="grey")


def test_window_keeps_a_centred_square_and_fills_the_rest_with_background():
    images = _cells(4, size=40)
    aug = BatchAugment(_only(window_prob=1.0, window_range=(0.5, 0.5)), 40, MEAN, STD)
    torch.manual_seed(0)
    out = _denorm(aug(images))
    src = images.float() / 255
    fill = background_fill(src)
    assert torch.allclose(out[:, :, 20, 20], src[:, :, 20, 20], atol=1e-5)  # centre kept
    for y, x in ((1, 1), (38, 2), (3, 37), (20, 2), (2, 20)):  # outside the half-frame window
        assert torch.allclose(out[:, :, y, x], fill[:, :, 0, 0], atol=1e-5)
    # the background estimate is the pale background, not the purple cell
    assert (fill[:, :, 0, 0] - torch.tensor([0.92, 0.85, 0.70])).abs().max() < 0.05
    none = BatchAugment(_only(window_prob=0.0), 40, MEAN, STD)
    assert torch.allclose(_denorm(none(images)), src, atol=1e-5)


def test_channel_gain_is_a_per_image_per_channel_cast():
    src, out = _augment(_cells(6), 1, channel_gain=0.2)
    ratio = out[:, :, 20:28, 20:28] / src[:, :, 20:28, 20:28].clamp(min=1e-3)  # the dark disc: no clipping
    gains = ratio.flatten(2).median(dim=2).values  # (6, 3)
    assert (gains - 1).abs().max() <= 0.2 + 1e-3
    assert (gains - 1).abs().max() > 0.02  # it did change something
    assert gains.std(dim=1).max() > 0.005  # channels differ: a cast, not brightness
    assert torch.allclose(ratio, gains[:, :, None, None].expand_as(ratio), atol=0.02)


YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def test_hue_rotation_turns_chroma_and_keeps_luma_and_grey():
    colours = torch.tensor([[0.35, 0.20, 0.50], [0.90, 0.60, 0.55], [0.5, 0.5, 0.5]])
    m = hue_rotation(torch.tensor([0.0, 30.0, -75.0, 360.0]))
    assert torch.allclose(m[0], torch.eye(3), atol=1e-6) and torch.allclose(m[3], torch.eye(3), atol=1e-5)
    for k, angle in ((1, 30.0), (2, -75.0)):
        out = colours @ m[k]
        yiq_in, yiq_out = colours @ YIQ.T, out @ YIQ.T
        assert torch.allclose(yiq_out[:, 0], yiq_in[:, 0], atol=1e-5)  # luma kept
        assert torch.allclose(yiq_out[:, 1:].norm(dim=1), yiq_in[:, 1:].norm(dim=1), atol=1e-5)  # chroma size kept
        turned = torch.rad2deg(torch.atan2(yiq_out[:2, 2], yiq_out[:2, 1]) - torch.atan2(yiq_in[:2, 2], yiq_in[:2, 1]))
        assert torch.allclose((turned - angle + 180) % 360 - 180, torch.zeros(2), atol=1e-3)
        assert torch.allclose(out[2], colours[2], atol=1e-5)  # grey stays grey
    # rotations compose: 30 then -75 is -45
    assert torch.allclose(m[1] @ m[2], hue_rotation(torch.tensor([-45.0]))[0], atol=1e-5)


def test_hue_augmentation_turns_each_image_by_its_own_angle_within_range():
    images = _cells(8)
    src, out = _augment(images, 3, hue=40.0)
    disc_in = src[:, :, 20:28, 20:28].mean(dim=(2, 3)) @ YIQ.T  # (8, 3) purple disc, in gamut
    disc_out = out[:, :, 20:28, 20:28].mean(dim=(2, 3)) @ YIQ.T
    assert torch.allclose(disc_out[:, 0], disc_in[:, 0], atol=2e-3)
    turned = torch.rad2deg(torch.atan2(disc_out[:, 2], disc_out[:, 1]) - torch.atan2(disc_in[:, 2], disc_in[:, 1]))
    turned = (turned + 180) % 360 - 180
    assert turned.abs().max() <= 40.5
    assert turned.abs().max() > 5 and turned.std() > 3  # it turned, and not all by the same angle
    _, unturned = _augment(images, 3, hue=0.0)
    assert torch.allclose(unturned, src, atol=1e-5)
