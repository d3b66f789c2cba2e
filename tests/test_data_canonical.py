"""Canonical framing and colour (data.canonical): nucleus search, re-framing, white balance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from celluscan.data.canonical import (
    CanonicalConfig,
    apply_colour,
    background_colour,
    REINHARD_REFERENCE,
    STAIN_ANCHOR_REFERENCE,
    find_nucleus,
    lab_to_rgb,
    optical_density,
    reframe,
    reinhard,
    rgb_to_lab,
    stain_anchor,
    stain_anchors,
    white_balance,
)
from celluscan.data.tensor_cache import TensorCache
from celluscan.data.transforms import preprocess

YELLOW_BG = (235, 215, 150)
PBC_BG = (230, 215, 225)
NUCLEUS = (80, 40, 130)  # purple: absorbs red light
RED_CELL = (215, 150, 160)  # pink: mostly absorbs green


def smear(side: int, bg, nucleus_xy, nucleus_r: float, red_cells=(), lobes: bool = False) -> Image.Image:
    """A synthetic smear crop: background, pink red cells, a purple nucleus (optionally two lobes)."""
    yy, xx = np.mgrid[0:side, 0:side]
    arr = np.empty((side, side, 3), np.float32)
    arr[:] = bg
    for (x, y, r) in red_cells:
        arr[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = RED_CELL
    cx, cy = nucleus_xy
    if lobes:  # two lobes joined by a thin bridge, like a band / segmented nucleus
        for dx in (-nucleus_r * 0.6, nucleus_r * 0.6):
            arr[(xx - cx - dx) ** 2 + (yy - cy) ** 2 <= (nucleus_r * 0.55) ** 2] = NUCLEUS
    else:
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 <= nucleus_r ** 2] = NUCLEUS
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_config_validates_and_round_trips():
    cfg = CanonicalConfig(framing="nucleus", colour="grey", framing_scale=3.0)
    assert CanonicalConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.active and not CanonicalConfig().active
    assert CanonicalConfig().key() == "" and cfg.key() != CanonicalConfig(framing="nucleus").key()
    with pytest.raises(ValueError, match="framing"):
        CanonicalConfig(framing="cell")
    with pytest.raises(ValueError, match="colour"):
        CanonicalConfig(colour="sepia")
    with pytest.raises(ValueError, match="unknown canonical"):
        CanonicalConfig.from_dict({"framing": "nucleus", "zoom": 2})


@pytest.mark.parametrize("side, r", [(360, 30), (240, 45), (120, 40)])
def test_find_nucleus_locates_an_off_centre_nucleus(side, r):
    cx, cy = side * 0.55, side * 0.45
    img = smear(side, PBC_BG, (cx, cy), r, red_cells=[(side * 0.15, side * 0.2, side * 0.08),
                                                      (side * 0.85, side * 0.8, side * 0.08)])
    nuc = find_nucleus(img)
    assert nuc is not None
    assert abs(nuc.cx - cx) < side * 0.02 and abs(nuc.cy - cy) < side * 0.02
    assert nuc.size == pytest.approx(np.sqrt(np.pi) * r, rel=0.12)


def test_find_nucleus_keeps_lobes_together():
    img = smear(200, PBC_BG, (100, 100), 30, lobes=True)
    nuc = find_nucleus(img)
    one_lobe = np.sqrt(np.pi) * 30 * 0.55
    assert nuc is not None and nuc.size > 1.3 * one_lobe  # both lobes counted
    assert abs(nuc.cx - 100) < 4


def test_find_nucleus_none_on_blank_or_pale_images():
    assert find_nucleus(Image.new("RGB", (100, 100), PBC_BG)) is None
    pale = smear(100, (240, 240, 240), (50, 50), 20)
    pale = Image.blend(pale, Image.new("RGB", (100, 100), (240, 240, 240)), 0.9)
    assert find_nucleus(pale) is None


def test_reframe_makes_tight_and_loose_crops_alike():
    """The same cell, once loosely framed (PBC-like) and once cropped tightly (other labs),
    comes out at the same relative scale."""
    loose = smear(360, PBC_BG, (180, 180), 40)
    tight = smear(110, YELLOW_BG, (55, 55), 40)
    cfg = CanonicalConfig(framing="nucleus", framing_scale=3.0)
    a, b = reframe(loose, cfg), reframe(tight, cfg)
    expected = 3.0 * np.sqrt(np.pi) * 40
    assert a.size[0] == pytest.approx(expected, rel=0.12)
    assert b.size[0] == pytest.approx(expected, rel=0.12)
    # the tight crop ran off its image: the canvas is filled with its own background colour
    assert np.abs(np.asarray(b)[0, 0].astype(int) - YELLOW_BG).max() <= 2


def test_reframe_clamps_and_falls_back():
    cfg = CanonicalConfig(framing="nucleus", framing_scale=50.0, max_canvas=2.0)
    img = smear(100, PBC_BG, (50, 50), 10)
    assert reframe(img, cfg).size == (200, 200)  # clamped at max_canvas x side
    blank = Image.new("RGB", (80, 80), PBC_BG)
    assert reframe(blank, cfg).size == (80, 80)  # no nucleus: unchanged


def test_white_balance_makes_any_background_white():
    img = smear(120, YELLOW_BG, (60, 60), 20)
    arr = np.asarray(img, np.float32) / 255
    bg = background_colour(arr)
    assert np.allclose(bg * 255, YELLOW_BG, atol=2)
    out = np.asarray(apply_colour(img, "white_balance"), np.float32)
    assert out[0, 0].min() >= 252
    nucleus = out[60, 60]
    assert nucleus[2] > nucleus[0]  # still blue-ish relative to red after the correction
    assert np.allclose(white_balance(arr, bg)[0, 0], 1.0, atol=0.01)


def test_grey_has_no_hue_and_keeps_the_nucleus_dark():
    out = np.asarray(apply_colour(smear(120, YELLOW_BG, (60, 60), 20), "grey"))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[60, 60, 0] < 40 and out[0, 0, 0] > 240
    with pytest.raises(ValueError):
        apply_colour(Image.new("RGB", (4, 4)), "sepia")


def test_lab_conversion_round_trips_and_hits_known_values():
    rng = np.random.default_rng(0)
    arr = rng.random((20, 20, 3))
    assert np.allclose(lab_to_rgb(rgb_to_lab(arr)), arr, atol=1e-9)
    white, black = rgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert np.allclose(white, [100, 0, 0], atol=0.05) and np.allclose(black, [0, 0, 0], atol=1e-6)
    red = rgb_to_lab(np.array([1.0, 0.0, 0.0]))  # sRGB red: L* 53.2, a* 80.1, b* 67.2
    assert np.allclose(red, [53.24, 80.09, 67.20], atol=0.1)


def test_reinhard_moves_any_stain_onto_the_reference():
    pbc = np.asarray(smear(120, PBC_BG, (60, 60), 20, red_cells=[(20, 25, 14), (95, 90, 14)]), np.float64) / 255
    yellow_dim = np.clip(pbc * np.array([1.0, 0.93, 0.6]) * 0.85, 0, 1)  # another lab's cast and light
    a, b = reinhard(pbc), reinhard(yellow_dim)
    lab_a, lab_b = rgb_to_lab(a).reshape(-1, 3), rgb_to_lab(b).reshape(-1, 3)
    ref_mean, ref_std = REINHARD_REFERENCE
    assert np.allclose(lab_a.mean(0), ref_mean, atol=3.0) and np.allclose(lab_a.std(0), ref_std, atol=3.0)
    assert np.abs(lab_a.mean(0) - lab_b.mean(0)).max() < 3.0  # the cast is gone ...
    assert np.abs(a - b).mean() < 0.03  # ... pixel by pixel, not only on average
    assert np.abs(pbc - yellow_dim).mean() > 0.1
    own = rgb_to_lab(pbc).reshape(-1, 3)  # mapping onto its own statistics changes nothing
    assert np.allclose(reinhard(pbc, (own.mean(0), own.std(0))), pbc, atol=1e-6)
    blank = np.full((8, 8, 3), 0.9)  # a flat image is shifted, not blown up
    assert np.isfinite(reinhard(blank)).all()
    img = Image.fromarray((pbc * 255).astype(np.uint8))
    assert np.asarray(apply_colour(img, "reinhard")).shape == (120, 120, 3)
    assert CanonicalConfig(colour="reinhard").key().split(":")[1] == "reinhard"



def _restain(arr: np.ndarray, bg, density_gain) -> np.ndarray:
    """The same slide under another lab's light (background ``bg``) and stain strength: each
    channel's optical density against the white background scaled by ``density_gain``."""
    od = -np.log(np.clip(arr / background_colour(arr), 1e-3, 1.0))
    return np.asarray(bg, np.float32) * np.exp(-od * np.asarray(density_gain, np.float32))


def test_stain_anchor_maps_background_and_nucleus_onto_the_reference():
    pbc = np.asarray(smear(120, PBC_BG, (60, 60), 20, red_cells=[(20, 25, 14), (95, 90, 14)]), np.float32) / 255
    out = stain_anchor(pbc)
    ref_bg, ref_nucleus = (np.asarray(v) for v in STAIN_ANCHOR_REFERENCE)
    bg, nucleus = stain_anchors(out)
    assert np.allclose(bg, ref_bg, atol=0.01)
    assert np.allclose(nucleus, ref_nucleus, atol=0.05)
    assert np.allclose(out[60, 60], ref_bg * np.exp(-ref_nucleus), atol=0.02)  # the nucleus colour
    # another lab: yellow light and a stain 1.6x stronger in red, 0.7x in blue
    other = _restain(pbc, (0.95, 0.9, 0.6), (1.6, 1.0, 0.7))
    assert np.abs(pbc - other).mean() > 0.05
    assert np.abs(stain_anchor(other) - out).max() < 0.03  # ... the anchors undo both
    # unlike Reinhard, the result does not depend on how much background the frame holds
    wide = np.asarray(smear(240, PBC_BG, (120, 120), 20, red_cells=[(80, 85, 14), (155, 150, 14)]), np.float32) / 255
    assert np.abs(stain_anchor(wide)[60:180, 60:180] - out).max() < 0.03
    assert np.abs(reinhard(wide)[60:180, 60:180] - reinhard(pbc)).max() > 0.05
    # a blank image (no nucleus) only gets the reference background
    blank = np.full((16, 16, 3), (0.9, 0.85, 0.5), np.float32)
    assert stain_anchors(blank)[1] is None
    assert np.allclose(stain_anchor(blank), ref_bg, atol=1e-3)
    img = Image.fromarray((pbc * 255).astype(np.uint8))
    assert np.asarray(apply_colour(img, "stain_anchor")).shape == (120, 120, 3)
    assert CanonicalConfig(colour="stain_anchor").key().split(":")[1] == "stain_anchor"


def test_reinhard_runs_in_the_input_precision_and_agrees_across_them():
    """float32 images stay float32 (the inference path), float64 and integer arrays run in
    float64, torch batches in their own dtype; all give the same colours to well under 1/255."""
    import torch

    pbc = np.asarray(smear(64, PBC_BG, (32, 32), 12), np.float64) / 255
    yellow = np.clip(pbc * np.array([1.0, 0.93, 0.6]), 0, 1)
    ref = np.stack([reinhard(pbc), reinhard(yellow)])
    single = reinhard(yellow.astype(np.float32))
    assert single.dtype == np.float32 and reinhard(pbc).dtype == np.float64
    assert np.abs(single - ref[1]).max() < 1e-4
    batch = reinhard(torch.from_numpy(np.stack([pbc, yellow])).float(), batch_dims=1)
    assert batch.dtype == torch.float32 and np.abs(batch.numpy() - ref).max() < 1e-4


def test_preprocess_applies_the_canonical_steps():
    img = smear(300, YELLOW_BG, (150, 150), 35)
    plain = preprocess(img, 64)
    assert preprocess(img, 64, canonical=CanonicalConfig()).tobytes() == plain.tobytes()
    canon = preprocess(img, 64, canonical={"framing": "nucleus", "colour": "grey", "framing_scale": 3.0})
    assert canon.size == (64, 64)
    arr = np.asarray(canon)
    assert (arr[..., 0] == arr[..., 2]).all()
    # the nucleus now spans about 1/3 of the output instead of 1/6
    dark = (arr[..., 0] < 100).sum()
    assert dark == pytest.approx(np.pi * (64 / 3 / np.sqrt(np.pi)) ** 2, rel=0.2)


def test_tensor_cache_keeps_canonical_variants_apart(tmp_path):
    from types import SimpleNamespace

    paths = []
    for i in range(3):
        p = tmp_path / f"c{i}.png"
        smear(90, PBC_BG, (45, 45), 12 + i).save(p)
        paths.append(p)
    rows = [SimpleNamespace(path=str(p), label="lymphocyte", split="train", sha256=f"k{i}", source="s")
            for i, p in enumerate(paths)]
    cache_dir = tmp_path / "cache"
    plain = TensorCache.build(rows, 32, workers=1, progress=False, cache_dir=cache_dir)
    canon_cfg = CanonicalConfig(framing="nucleus", framing_scale=3.0)
    canon = TensorCache.build(rows, 32, workers=1, progress=False, cache_dir=cache_dir, canonical=canon_cfg)
    assert not torch.equal(plain.images, canon.images)
    assert len(list(cache_dir.glob("tensors_32*.npy"))) == 2
    again = TensorCache.build(rows, 32, workers=1, progress=False, cache_dir=cache_dir, canonical=canon_cfg)
    assert torch.equal(again.images, canon.images)
    expected = np.asarray(preprocess(Image.open(paths[1]), 32, canonical=canon_cfg)).transpose(2, 0, 1)
    assert np.array_equal(canon.images[1].numpy(), expected)


def test_predictor_applies_the_models_canonical_preprocessing(tmp_path):
    from celluscan.inference.predictor import Predictor
    from celluscan.models import create_model, load_model_dir, save_model_dir
    from celluscan.models.model_dir import ModelDirError
    from celluscan.taxonomy import CLASSES

    canon = {"framing": "nucleus", "colour": "white_balance", "framing_scale": 3.0}
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "canonical": canon}
    save_model_dir(create_model("vit_test"), tmp_path / "m", CLASSES, prep, {})
    _, info = load_model_dir(tmp_path / "m")
    assert info.preprocessing["canonical"]["framing"] == "nucleus"
    img = smear(300, YELLOW_BG, (140, 160), 35)
    predictor = Predictor.from_model_dir(tmp_path / "m")
    expected = np.asarray(preprocess(img, 32, canonical=canon))
    assert np.array_equal(predictor.prepare(img), expected)
    assert not np.array_equal(expected, np.asarray(preprocess(img, 32)))
    with pytest.raises(ModelDirError, match="canonical"):
        save_model_dir(create_model("vit_test"), tmp_path / "bad", CLASSES,
                       {**prep, "canonical": {"framing": "cell"}}, {})
        load_model_dir(tmp_path / "bad")


def test_preprocess_view_locates_what_the_model_sees():
    from celluscan.data.transforms import preprocess_view, square_view

    assert square_view(60, 40) == (0, -10, 60)  # padded top and bottom
    assert square_view(363, 360) == (1, 0, 360)  # near-square: cropped
    assert square_view(50, 50) == (0, 0, 50)
    img = smear(300, PBC_BG, (170, 140), 35)
    assert preprocess_view(img) == (0, 0, 300)
    left, top, side = preprocess_view(img, {"framing": "nucleus", "framing_scale": 3.0})
    assert side == pytest.approx(3.0 * np.sqrt(np.pi) * 35, rel=0.12)
    assert left + side / 2 == pytest.approx(170, abs=3) and top + side / 2 == pytest.approx(140, abs=3)


def test_explanation_of_a_reframed_image_lies_on_the_region_the_model_saw(tmp_path):
    from celluscan.data.transforms import preprocess_view
    from celluscan.inference.predictor import Predictor
    from celluscan.models import create_model, save_model_dir
    from celluscan.taxonomy import CLASSES

    canon = {"framing": "nucleus", "colour": "none", "framing_scale": 3.0}
    save_model_dir(create_model("vit_test"), tmp_path / "m", CLASSES,
                   {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "canonical": canon}, {})
    img = smear(300, PBC_BG, (200, 110), 30)  # nucleus off-centre: the canvas is a sub-square
    heat = Predictor.from_model_dir(tmp_path / "m").explain(img)
    assert heat.shape == (300, 300)
    left, top, side = preprocess_view(img, canon)
    inside = np.zeros_like(heat, dtype=bool)
    inside[max(0, top):top + side, max(0, left):left + side] = True
    assert heat[~inside].max() == 0.0 and heat[inside].max() == pytest.approx(1.0)


def test_cell_region_colour_ignores_how_much_background_a_crop_shows():
    """``colour_region: cell`` measures Reinhard's statistics inside the cell disc: the same cell
    with a large yellow background and with a small one comes out alike inside the disc, while
    whole-image statistics (the default) let the background pull the cell's colours apart."""
    from celluscan.data.canonical import REINHARD_CELL_REFERENCE, cell_disc

    def frame(corner_r: int) -> np.ndarray:
        # a cell (nucleus + pink cytoplasm) in the centre; red cells in the corners, outside the
        # disc, cover more or less of the yellow background
        corners = [(x, y, corner_r) for x in (8, 120) for y in (8, 120)]
        return np.asarray(smear(128, YELLOW_BG, (64, 64), 16, red_cells=[(64, 64, 30)] + corners), np.float32) / 255

    small_bg, big_bg = frame(22), frame(1)
    cell = CanonicalConfig(colour="reinhard", colour_region="cell")
    disc = cell_disc(128, 128, cell.cell_radius) > 0.99
    whole = CanonicalConfig(colour="reinhard")
    out = {name: [np.asarray(apply_colour(Image.fromarray((a * 255).astype(np.uint8)), cfg), np.float32)[disc] / 255
                  for a in (small_bg, big_bg)] for name, cfg in (("cell", cell), ("whole", whole))}
    assert np.abs(out["cell"][0] - out["cell"][1]).mean() < 0.01
    assert np.abs(out["whole"][0] - out["whole"][1]).mean() > 0.03
    # inside the disc the statistics land on the cell reference
    lab = rgb_to_lab(out["cell"][1])
    assert np.allclose(lab.mean(0), REINHARD_CELL_REFERENCE[0], atol=3.0)
    with pytest.raises(ValueError, match="colour_region"):
        CanonicalConfig(colour="grey", colour_region="cell")
    with pytest.raises(ValueError, match="cell_radius"):
        CanonicalConfig(cell_radius=0.9)
    assert cell.key() != whole.key() and CanonicalConfig.from_dict(cell.to_dict()) == cell


def test_mask_outside_cell_paints_everything_but_the_cell_disc():
    from celluscan.data.canonical import BACKGROUND_REFERENCE, cell_disc

    img = smear(100, YELLOW_BG, (50, 50), 12, red_cells=[(8, 8, 10), (92, 90, 10)])
    cfg = CanonicalConfig(mask_outside_cell=True, cell_radius=0.3)
    assert cfg.active and cfg.key() != ""
    out = np.asarray(preprocess(img, 100, canonical=cfg), np.int16)
    bg = np.round(np.asarray(BACKGROUND_REFERENCE) * 255)
    disc = cell_disc(100, 100, 0.3)
    outside, inside = disc == 0, disc == 1
    assert np.abs(out[outside] - bg).max() <= 1  # red cells in the corners are gone
    assert np.array_equal(out[inside], np.asarray(img, np.int16)[inside])  # the cell is untouched
    assert np.abs(out[50, 50] - np.array(NUCLEUS)).max() <= 1


def test_reinhard_uint8_matches_the_float_path_to_one_level():
    """The byte path inference uses (lookup tables, planar arithmetic) gives the float path's
    result rounded to bytes, to within one level, for whole-image and cell-disc statistics."""
    from celluscan.data.canonical import (REINHARD_CELL_REFERENCE, cell_disc, lab_to_linear,
                                          linear_to_lab, reinhard_uint8)

    rng = np.random.default_rng(0)
    pbc = np.asarray(smear(96, PBC_BG, (48, 48), 16, red_cells=[(15, 15, 12), (80, 75, 12)]), np.float32)
    noisy = np.clip(pbc * np.array([1.0, 0.9, 0.65]) + rng.normal(0, 12, pbc.shape), 0, 255).astype(np.uint8)
    disc = cell_disc(96, 96, 0.36)
    for img, ref, weights in ((noisy, REINHARD_REFERENCE, None), (noisy, REINHARD_CELL_REFERENCE, disc),
                              (np.full((8, 8, 3), 200, np.uint8), REINHARD_REFERENCE, None)):
        exact = np.floor(np.clip(reinhard(img.astype(np.float64) / 255, ref, weights=weights), 0, 1) * 255 + 0.5)
        fast = reinhard_uint8(img, ref, weights)
        assert fast.dtype == np.uint8 and fast.shape == img.shape
        diff = np.abs(fast.astype(int) - exact)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # the planar layout is the same conversion as channels-last
    lin = rng.random((5, 7, 3))
    planar = linear_to_lab(np.moveaxis(lin, -1, 0), axis=0)
    assert np.allclose(np.moveaxis(planar, 0, -1), linear_to_lab(lin), atol=1e-9)
    assert np.allclose(lab_to_linear(linear_to_lab(lin)), lin, atol=1e-9)


def test_optical_density_of_one_channel_is_that_channel_of_all_three_bit_for_bit():
    rng = np.random.default_rng(4)
    arr = rng.random((37, 41, 3), dtype=np.float32)
    arr[:5] = 0.0  # fully absorbing rows: the 1e-3 clamp
    for bg in (background_colour(arr), np.array([0.1, 0.9, 1.0], dtype=np.float32)):  # 0.1: the 0.25 floor
        full = optical_density(arr, bg)
        assert full.shape == arr.shape and full.max() > 6.0
        for c in range(3):
            assert np.array_equal(optical_density(arr[..., c:c + 1], bg[c:c + 1])[..., 0], full[..., c])
