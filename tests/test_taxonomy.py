"""The taxonomy as data: canonical order, groups, and label mapping."""

from __future__ import annotations

import pytest

from celluscan.taxonomy import (
    CLASS_TO_INDEX,
    CLASSES,
    GROUPS,
    NUM_CLASSES,
    SKIP,
    TAXONOMY,
    LabelMapper,
    UnknownLabelError,
    group_of,
    normalise_name,
)

EXPECTED_CLASSES = (
    "band_neutrophil", "basophil", "eosinophil", "erythroblast", "immature_granulocyte",
    "lymphocyte", "metamyelocyte", "monocyte", "myeloblast", "myelocyte", "neutrophil",
    "platelet", "promyelocyte", "segmented_neutrophil",
)


def test_fourteen_classes_in_canonical_alphabetical_order():
    assert NUM_CLASSES == 14
    assert CLASSES == EXPECTED_CLASSES
    assert list(CLASSES) == sorted(CLASSES)
    assert [CLASS_TO_INDEX[c] for c in CLASSES] == list(range(14))
    assert [c.index for c in TAXONOMY.classes] == list(range(14))


def test_codes_and_ids_unique():
    codes = [c.code for c in TAXONOMY.classes]
    assert len(set(codes)) == len(codes) == 14
    assert len(set(CLASSES)) == 14


def test_groups_cover_every_class_exactly_once():
    members = [m for g in GROUPS for m in TAXONOMY.groups[g].members]
    assert sorted(members) == sorted(CLASSES)
    for c in CLASSES:
        assert c in TAXONOMY.groups[group_of(c)].members
    assert len(TAXONOMY.group_index_map()) == 14
    assert group_of("myelocyte") == "granulocytic_precursor"


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("BA_1.jpg", "basophil"),
        ("pbc_SNE_2.jpg", "segmented_neutrophil"),
        ("NEUTROPHIL_3.jpg", "neutrophil"),
        ("PLATELET_4.jpg", "platelet"),
        ("MY_5.jpg", "myelocyte"),
        ("MMY_6.jpg", "metamyelocyte"),
        ("IG_7.jpg", "immature_granulocyte"),
        ("ERB_8.jpg", "erythroblast"),
    ],
)
def test_pbc_prefixes(filename, expected):
    label, raw = LabelMapper().map_file(filename, "some_folder")
    assert label == expected
    assert raw in filename


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("MYO_0001.tiff", "myeloblast"),
        ("MYB_0002.tiff", "myelocyte"),  # Munich MYB is myelocyte, not myeloblast
        ("aml_NGS_3.jpg", "segmented_neutrophil"),
        ("NGB_4.tiff", "band_neutrophil"),
        ("PMO_5.tiff", "promyelocyte"),
    ],
)
def test_munich_codes(filename, expected):
    assert LabelMapper().map_file(filename, None)[0] == expected


def test_munich_unmapped_code_is_never_guessed_from_the_folder():
    # A smudge cell in a myeloblast folder must not become a myeloblast.
    label, raw = LabelMapper().map_file("KSC_0001.tiff", "myeloblast")
    assert label is None
    assert raw == "KSC"


@pytest.mark.parametrize(
    "folder, expected",
    [
        ("Band Neutrophils", "band_neutrophil"),
        ("seg_neutrophil", "segmented_neutrophil"),
        ("Lymphocytes", "lymphocyte"),
        ("Platelets", "platelet"),
        ("Metamyelocytes", "metamyelocyte"),
        ("Eosinophiles", "eosinophil"),
        ("neutrophiles", "neutrophil"),
        ("NRBC", "erythroblast"),
        ("segmented-neutrophil", "segmented_neutrophil"),
        ("  Monocytes ", "monocyte"),
    ],
)
def test_forgiving_folder_names(folder, expected):
    assert LabelMapper().map_name(folder) == expected
    assert LabelMapper().map_file("img_001.png", folder) == (expected, folder)


def test_normalise_name():
    assert normalise_name("Band Neutrophils") == "band_neutrophil"
    assert normalise_name("seg-neutrophil") == "seg_neutrophil"
    assert normalise_name("Eosinophiles") == "eosinophil"
    assert normalise_name("glass") == "glass"  # 'ss' is not a plural


def test_unknown_folder_maps_to_none():
    assert LabelMapper().map_file("img.png", "mystery_cells") == (None, "mystery_cells")


def test_user_map_file(tmp_path):
    p = tmp_path / "map.yaml"
    p.write_text("Weird Lymphs: lymphocyte\nSMUDGE: skip\nKSC: skip\n", encoding="utf-8")
    m = LabelMapper.from_file(p)
    assert m.map_name("Weird Lymphs") == "lymphocyte"
    assert m.map_name("weird_lymph") == "lymphocyte"  # normalised key also matches
    assert m.map_file("x.png", "SMUDGE") == (SKIP, "SMUDGE")
    assert m.map_file("KSC_0001.tiff", "myeloblast") == (SKIP, "KSC")
    assert m.map_file("BA_1.jpg", "Weird Lymphs")[0] == "basophil"  # file code wins


def test_user_map_rejects_unknown_class(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("foo: not_a_class\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not_a_class"):
        LabelMapper.from_file(p)
    p.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        LabelMapper.from_file(p)


def test_unknown_label_error_lists_every_label_and_how_to_fix():
    err = UnknownLabelError(
        {
            "mystery": ["a/mystery/1.png", "a/mystery/2.png", "a/mystery/3.png", "a/mystery/4.png"],
            "KSC": ["b/KSC_0001.tiff"],
            "Smudge Cells": ["c/Smudge Cells/x.jpg"],
        }
    )
    msg = str(err)
    for label in ("'mystery'", "'KSC'", "'Smudge Cells'"):
        assert label in msg
    assert "b/KSC_0001.tiff" in msg and "a/mystery/1.png" in msg
    assert "a/mystery/4.png" not in msg  # at most three examples per label
    assert "--label-map" in msg and "skip" in msg and "--skip-unknown" in msg
    assert "3 label(s)" in msg
    assert set(err.unknown) == {"mystery", "KSC", "Smudge Cells"}
