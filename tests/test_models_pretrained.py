"""load_pretrained: local files only, either layout, head dropping, position-embedding resizing,
and refusal of pickles that would run code."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from celluscan.models import PretrainedWeightsError, create_model, load_pretrained, to_torchvision_state_dict


@pytest.fixture
def source():
    """A 'pretrained' vit_test with an ImageNet-sized head (1000 classes)."""
    torch.manual_seed(1)
    return create_model("vit_test", num_classes=1000)


def assert_backbone_equal(model, source, skip=("head.weight", "head.bias")):
    theirs = source.state_dict()
    for key, tensor in model.state_dict().items():
        if key not in skip:
            assert torch.equal(tensor, theirs[key]), key


def test_torchvision_pth_with_1000_class_head_drops_the_head(tmp_path, source, caplog):
    path = tmp_path / "vit_tv.pth"
    torch.save(to_torchvision_state_dict(source.state_dict()), path)
    torch.manual_seed(2)
    model = create_model("vit_test", num_classes=14)
    fresh_head = model.head.weight.clone()
    with caplog.at_level(logging.INFO, logger="celluscan.models.pretrained"):
        report = load_pretrained(model, path)
    assert report.layout == "torchvision" and report.head_dropped
    assert "1000 classes" in caplog.text and "dropping the pretrained head" in caplog.text
    assert_backbone_equal(model, source)
    assert torch.equal(model.head.weight, fresh_head)


@pytest.mark.parametrize("layout", ["ours", "torchvision"])
def test_safetensors_in_either_layout_with_matching_head(tmp_path, source, layout):
    state = source.state_dict() if layout == "ours" else to_torchvision_state_dict(source.state_dict())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model("vit_test", num_classes=1000)
    report = load_pretrained(model, path)
    assert report.layout == layout and not report.head_dropped and report.pos_embed_resized is None
    assert_backbone_equal(model, source, skip=())


def test_headless_file_and_model_dir_source(tmp_path, source):
    tv = {k: v for k, v in to_torchvision_state_dict(source.state_dict()).items() if not k.startswith("heads.")}
    torch.save(tv, tmp_path / "headless.pth")
    model = create_model("vit_test")
    report = load_pretrained(model, tmp_path / "headless.pth")
    assert report.head_dropped
    assert_backbone_equal(model, source)
    # a model directory works as a source too
    from celluscan.models import save_model_dir

    save_model_dir(source, tmp_path / "dir", [f"c{i}" for i in range(1000)], {"mean": [0] * 3, "std": [1] * 3})
    other = create_model("vit_test", num_classes=1000)
    load_pretrained(other, tmp_path / "dir")
    assert_backbone_equal(other, source, skip=())


def test_position_embeddings_resized_for_another_image_size(tmp_path, source):
    path = tmp_path / "w32.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model("vit_test", image_size=48)
    report = load_pretrained(model, path)
    assert report.pos_embed_resized == ((1, 17, 32), (1, 37, 32))
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 14)


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1"])
def test_named_torchvision_weights_explain_how_to_supply_a_file(monkeypatch, name):
    import urllib.request

    def no_network(*_args, **_kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(create_model("vit_test"), name)
    message = str(err.value)
    assert "never downloads" in message and "vit_b_16-c867db91.pth" in message and "--pretrained" in message


def _payload(marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    # prove the payload is live: unpickling it unsafely creates the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"  # torch.save's zip container
    torch.save({"conv_proj.weight": torch.zeros(1), "evil": _payload(marker)}, zipped)
    raw = tmp_path / "evil_raw.pth"  # a bare pickle stream
    raw.write_bytes(pickle.dumps({"evil": _payload(marker)}))
    for path in (zipped, raw):
        with pytest.raises(PretrainedWeightsError, match="refused") as err:
            load_pretrained(create_model("vit_test"), path)
        assert str(path) in str(err.value)
    assert not marker.exists()


def test_files_that_do_not_fit_are_clear_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="not found"):
        load_pretrained(create_model("vit_test"), missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(PretrainedWeightsError, match="safetensors"):
        load_pretrained(create_model("vit_test"), garbage)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(PretrainedWeightsError, match="expected a state dict"):
        load_pretrained(create_model("vit_test"), tmp_path / "list.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(PretrainedWeightsError, match="not a ViT state dict"):
        load_pretrained(create_model("vit_test"), tmp_path / "resnet.pth")
    # patchify weights into a conv-stem model: named mismatch, model untouched
    save_file(create_model("vit_test").state_dict(), str(tmp_path / "patchify.safetensors"))
    stem = create_model("vit_test", conv_stem=True)
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    with pytest.raises(PretrainedWeightsError, match=r"conv_stem=True.*missing \['patch_embed\.stem"):
        load_pretrained(stem, tmp_path / "patchify.safetensors")
    assert all(torch.equal(before[k], v) for k, v in stem.state_dict().items())
    # a wider model's weights
    save_file(create_model("vit_test", num_classes=14, mlp_dim=128).state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        load_pretrained(create_model("vit_test"), tmp_path / "wide.safetensors")
