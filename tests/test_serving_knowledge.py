"""The knowledge cards: complete, valid, and the flag rules the differential relies on."""

from __future__ import annotations

import copy

import pytest
import yaml

from celluscan.serving.knowledge import (
    MORPHOLOGY_FIELDS,
    KnowledgeError,
    load_knowledge,
    parse_knowledge,
    render_card_markdown,
)
from celluscan.taxonomy import CLASSES, TAXONOMY

KB = load_knowledge()


@pytest.fixture()
def raw():
    from importlib import resources

    text = resources.files("celluscan.serving").joinpath("knowledge.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def test_one_card_per_class_in_canonical_order():
    assert tuple(KB.cards) == CLASSES
    for cid, card in KB.cards.items():
        assert card.name == TAXONOMY.cls(cid).name
        assert card.group == TAXONOMY.group_of(cid)
        assert len(card.summary) > 40
        for field in MORPHOLOGY_FIELDS:
            assert getattr(card.morphology, field), (cid, field)
        assert card.look_alikes, cid


def test_look_alike_class_ids_are_real_classes():
    for card in KB.cards.values():
        for la in card.look_alikes:
            if la.class_id is not None:
                assert la.class_id in CLASSES and la.class_id != card.id
                assert la.name == TAXONOMY.cls(la.class_id).name


def test_reference_ranges_match_textbook_values():
    rr = {c: KB.card(c).reference_range for c in CLASSES}
    assert rr["segmented_neutrophil"].percent == (40, 75)
    assert rr["segmented_neutrophil"].absolute == (2.0, 7.5)
    assert rr["lymphocyte"].percent == (20, 45)
    assert rr["monocyte"].percent == (2, 10)
    assert rr["eosinophil"].percent == (1, 6)
    assert rr["basophil"].percent == (0, 2)
    assert rr["platelet"].absolute == (150, 400) and rr["platelet"].absolute_unit == "x10^9/L"
    for absent in ("myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "erythroblast",
                   "immature_granulocyte"):
        assert rr[absent].normally_absent, absent
        assert KB.card(absent).present_in, absent
    for present in ("segmented_neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"):
        assert not rr[present].normally_absent
        assert KB.card(present).raised and KB.card(present).lowered, present


def test_flag_rules():
    blast = KB.card("myeloblast").flag_if_present
    assert blast.severity == "urgent" and "Blasts present" in blast.text
    for cid in ("promyelocyte", "myelocyte", "metamyelocyte", "immature_granulocyte", "erythroblast"):
        assert KB.card(cid).flag_if_present.severity == "review", cid
    assert KB.card("eosinophil").flag_if_above_percent.percent == 6
    assert KB.card("basophil").flag_if_above_percent.percent == 2
    for cid in ("segmented_neutrophil", "neutrophil", "platelet"):
        assert KB.card(cid).flag_if_present is None and KB.card(cid).flag_if_above_percent is None
    assert KB.severity_rank("urgent") > KB.severity_rank("review") > KB.severity_rank("info") \
        > KB.severity_rank("unreliable")


def test_notice_says_not_a_diagnosis():
    assert "not a diagnosis" in KB.notice
    assert "research and education" in KB.notice.lower()


def test_markdown_card_has_every_section():
    md = render_card_markdown(KB.card("eosinophil"), KB.notice)
    for part in ("### Eosinophil", "**Morphology**", "**Nucleus:**", "look-alikes", "Basophil",
                 "1-6% of leukocytes", "Parasitic", "not a diagnosis"):
        assert part in md, part


def test_unknown_card_lookup_names_the_known_ones():
    with pytest.raises(KeyError, match="band_neutrophil"):
        KB.card("smudge_cell")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["cells"].pop("basophil"), "missing: \\['basophil'\\]"),
        (lambda r: r["cells"]["myeloblast"]["flags"]["flag_if_present"].update(severity="panic"),
         "severity 'panic'"),
        (lambda r: r["cells"]["eosinophil"]["flags"]["flag_if_above_percent"].pop("percent"),
         "percent"),
        (lambda r: r["cells"]["lymphocyte"]["look_alikes"].append({"class": "smudge", "how_to_tell": "x"}),
         "'smudge' is not a class id"),
        (lambda r: r["cells"]["monocyte"]["reference_range"].update(percent=[10, 2]), "low <= high"),
        (lambda r: r["cells"]["monocyte"]["morphology"].pop("nucleus"), "'nucleus'"),
        (lambda r: r["cells"]["monocyte"]["flags"].update(flag_if_absent={}), "unknown rule"),
    ],
)
def test_malformed_knowledge_is_refused_with_a_clear_error(raw, mutate, message):
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(KnowledgeError, match=message):
        parse_knowledge(bad, "test.yaml")


def test_load_from_a_file_path(tmp_path, raw):
    p = tmp_path / "kb.yaml"
    raw["notice"] = "Custom notice: not a diagnosis."
    p.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert load_knowledge(p).notice == "Custom notice: not a diagnosis."
    with pytest.raises(KnowledgeError, match="cannot read"):
        load_knowledge(tmp_path / "missing.yaml")
