"""Pad-to-square, preprocessing and the torch transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from corpus import pattern_image

from celluscan.data.transforms import (
    TrivialAugmentEdgeFill,
    border_colour,
    eval_transform,
    pad_to_square,
    preprocess,
    train_transform,
)

BG = (231, 200, 215)  # a pale pink smear background


def cell_on_background(w: int, h: int) -> Image.Image:
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = BG
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (90, 40, 140)  # the "cell"
    arr[0, 0] = (0, 0, 0)  # a dark corner pixel must not sway the median
    return Image.fromarray(arr, "RGB")


def test_border_colour_is_the_median_of_the_border():
    assert border_colour(cell_on_background(60, 40)) == BG


@pytest.mark.parametrize("w, h", [(60, 40), (40, 60), (37, 81)])
def test_pad_to_square_edge_keeps_aspect_and_background(w, h):
    img = cell_on_background(w, h)
    sq = pad_to_square(img)
    side = max(w, h)
    assert sq.size == (side, side)
    arr = np.asarray(sq)
    # the original sits centred, unscaled
    x0, y0 = (side - w) // 2, (side - h) // 2
    assert np.array_equal(arr[y0 : y0 + h, x0 : x0 + w], np.asarray(img))
    # the padding is background colour
    if w < h:
        assert (arr[:, 0] == BG).all() and (arr[:, -1] == BG).all()
    else:
        assert (arr[0] == BG).all() and (arr[-1] == BG).all()


def test_pad_fill_options():
    img = cell_on_background(60, 40)
    assert np.asarray(pad_to_square(img, "white"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(pad_to_square(img, "black"))[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(pad_to_square(img, (1, 2, 3)))[0, 0].tolist() == [1, 2, 3]
    sq = cell_on_background(50, 50)
    assert pad_to_square(sq) is sq  # already square: unchanged
    for bad in ("purple", (1, 2), (0, 0, 300)):
        with pytest.raises(ValueError):
            pad_to_square(img, bad)


def test_preprocess_pads_then_resizes_bicubic():
    img = cell_on_background(120, 60)
    out = preprocess(img, 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert np.abs(arr[0, 16] - BG).max() <= 2  # top padding is background
    assert np.abs(arr[16, 16] - (90, 40, 140)).max() <= 6  # cell in the middle, not stretched
    assert preprocess(pattern_image(1, 32, 32), 32).size == (32, 32)
    grey = pattern_image(2, 30, 20, "L")
    assert preprocess(grey, 16).mode == "RGB"
    with pytest.raises(ValueError):
        preprocess(img, 0)


def test_eval_transform_normalises():
    img = cell_on_background(80, 50)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    t = eval_transform(48, mean, std)(img)
    assert t.shape == (3, 48, 48) and t.dtype == torch.float32
    ref = np.asarray(preprocess(img, 48), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(t, expected, atol=1e-5)
    with pytest.raises(ValueError):
        eval_transform(48, (0.5, 0.5), (0.2, 0.2))


def test_train_transform_random_but_right_shape():
    torch.manual_seed(0)
    img = pattern_image(3, 90, 70)
    t = train_transform(40, (0.5,) * 3, (0.25,) * 3, trivial_augment=True)
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 40, 40)
    assert not torch.equal(a, b)
    plain = train_transform(40, (0.5,) * 3, (0.25,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                            rotate_degrees=0, flips=False)
    ref = eval_transform(40, (0.5,) * 3, (0.25,) * 3)(img)
    assert torch.allclose(plain(img), ref, atol=0.05)  # no augmentation: same as eval
    with pytest.raises(ValueError):
        train_transform(40, (0.5,) * 3, (0.25,) * 3, scale=(0.0, 1.0))


def test_trivial_augment_fills_with_background():
    from torchvision.transforms import TrivialAugmentWide

    img = Image.new("RGB", (64, 64), BG)

    def uniform_count(aug) -> int:
        torch.manual_seed(0)
        outs = [np.asarray(aug(img)).reshape(-1, 3) for _ in range(60)]
        return sum(int((o.max(axis=0) == o.min(axis=0)).all()) for o in outs)

    # Every op maps a plain image to a plain image, unless a geometric op exposes corners
    # filled with another colour: with border-colour fill the result is always plain.
    assert uniform_count(TrivialAugmentEdgeFill()) == 60
    assert uniform_count(TrivialAugmentWide()) < 60  # torchvision's black fill shows wedges
