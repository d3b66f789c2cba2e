"""Model directory: atomic save, bit-exact round trip, bf16, and clear refusals of bad directories."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from celluscan.models import (
    ModelDirError,
    ModelDirInfo,
    create_model,
    load_model_dir,
    read_model_dir_info,
    save_model_dir,
    update_model_dir,
)
from celluscan.taxonomy import CLASSES

PREP = {"mean": [0.7, 0.6, 0.65], "std": [0.2, 0.21, 0.19]}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("vit_test", conv_stem=True, dropout=0.1).eval()


@pytest.fixture
def saved(tmp_path, model):
    return save_model_dir(model, tmp_path / "run" / "model", CLASSES, PREP, {"epoch": 3, "val_macro_f1": 0.5})


def test_round_trip_fp32_is_bit_exact(saved, model):
    loaded, info = load_model_dir(saved)
    assert isinstance(info, ModelDirInfo) and info.path == saved
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    # what config.json records
    assert info.class_names == CLASSES
    assert info.config["id2label"]["0"] == CLASSES[0] and len(info.config["id2label"]) == 14
    assert info.preprocessing == {"image_size": 32, "pad_fill": "edge", "temperature": 1.0, **PREP}
    assert info.metadata == {"epoch": 3, "val_macro_f1": 0.5}
    arch = info.config["architecture"]
    assert arch["name"] == "vit_test"
    assert arch["overrides"] == {"conv_stem": True, "dropout": 0.1}
    assert loaded.config == model.config == info.model_config
    assert info.weights_dtype == "float32"


def test_round_trip_bf16(tmp_path, model):
    from safetensors import safe_open

    path = save_model_dir(model, tmp_path / "m", CLASSES, PREP, {}, dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("head.weight").dtype == torch.bfloat16
    fp32_size = save_model_dir(model, tmp_path / "m32", CLASSES, PREP, {}).joinpath("model.safetensors").stat().st_size
    assert (path / "model.safetensors").stat().st_size < 0.6 * fp32_size
    loaded, info = load_model_dir(path)
    assert info.weights_dtype == "bfloat16"
    for key, tensor in model.state_dict().items():
        got = loaded.state_dict()[key]
        if tensor.is_floating_point():
            assert got.dtype == torch.float32, key
            assert torch.equal(got, tensor.to(torch.bfloat16).float()), key
        else:
            assert torch.equal(got, tensor), key  # BatchNorm's integer counter untouched
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), atol=5e-2, rtol=5e-2)


def test_save_replaces_existing_model_dir_atomically(tmp_path, model, saved):
    other = create_model("vit_test", num_classes=3)
    save_model_dir(other, saved, ["a", "b", "c"], PREP, {"v": 2})
    loaded, info = load_model_dir(saved)
    assert info.class_names == ("a", "b", "c") and info.metadata == {"v": 2}
    assert torch.equal(loaded.head.weight, other.head.weight)
    assert sorted(os.listdir(saved.parent)) == ["model"]  # no temp or old dirs left behind


def test_save_refuses_to_replace_other_things(tmp_path, model):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ModelDirError, match="not a model directory"):
        save_model_dir(model, precious, CLASSES, PREP, {})
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(ModelDirError, match="class_names"):
        save_model_dir(model, tmp_path / "m", CLASSES[:3], PREP, {})
    with pytest.raises(ModelDirError, match="std"):
        save_model_dir(model, tmp_path / "m", CLASSES, {"mean": [0, 0, 0], "std": [0, 1, 1]}, {})
    with pytest.raises(ValueError, match="JSON"):
        save_model_dir(model, tmp_path / "m", CLASSES, PREP, {"bad": object()})
    assert not (tmp_path / "m").exists()
    assert sorted(os.listdir(tmp_path)) == ["precious"]


def test_garbled_config_json_gives_a_clear_error(saved):
    text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ModelDirError, match=r"config\.json: garbled JSON at line \d+"):
        load_model_dir(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.pop("class_names"), "missing field"),
        (lambda d: d.update(class_names=d["class_names"][:-1]), "13 class_names for a model with 14"),
        (lambda d: d["preprocessing"].update(temperature=-1), "temperature"),
        (lambda d: d["architecture"]["config"].update(embed_dim=31), "bad architecture"),
        (lambda d: d["weights"].update(dtype="int8"), "bad weights"),
    ],
)
def test_inconsistent_config_is_refused(saved, edit, message):
    document = json.loads((saved / "config.json").read_text())
    edit(document)
    (saved / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelDirError, match=message):
        load_model_dir(saved)


def test_missing_files_are_refused(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="model.safetensors: missing"):
        load_model_dir(saved)
    (saved / "config.json").unlink()
    with pytest.raises(ModelDirError, match="config.json: missing"):
        load_model_dir(saved)
    with pytest.raises(ModelDirError, match="not a directory"):
        load_model_dir(tmp_path / "nowhere")


def test_corrupt_weights_are_refused_and_never_unpickled(saved, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (saved / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelDirError, match="sha256"):
        load_model_dir(saved)
    # even with a matching checksum the file is parsed as safetensors, never unpickled
    document = json.loads((saved / "config.json").read_text())
    document["weights"].pop("sha256")
    (saved / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelDirError, match="safetensors"):
        load_model_dir(saved)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_config_are_refused(saved, tmp_path):
    document = json.loads((saved / "config.json").read_text())
    document["architecture"]["config"]["conv_stem"] = False
    (saved / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelDirError, match="do not fit the architecture"):
        load_model_dir(saved)


def test_update_model_dir_sets_temperature(saved, model):
    info = update_model_dir(saved, preprocessing={"temperature": 1.7}, metadata={"calibrated": True})
    assert info.preprocessing["temperature"] == 1.7 and info.preprocessing["mean"] == PREP["mean"]
    assert info.metadata == {"epoch": 3, "val_macro_f1": 0.5, "calibrated": True}
    assert read_model_dir_info(saved).preprocessing["temperature"] == 1.7
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
    loaded, _ = load_model_dir(saved)  # weights untouched
    assert torch.equal(loaded.head.weight, model.head.weight)
