"""The docs: docs/cells.md is generated and up to date, links resolve, Markdown is well formed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from celluscan.taxonomy import CLASSES, TAXONOMY

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CELLS_DOC = DOCS / "cells.md"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_cells_doc", REPO / "scripts" / "make_cells_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def markdown_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    if (REPO / "README.md").is_file():
        files.append(REPO / "README.md")
    return files


# ---------------------------------------------------------------------------------------------
# docs/cells.md
# ---------------------------------------------------------------------------------------------


def test_cells_doc_knowledge_part_matches_a_fresh_generation(tmp_path):
    fresh = gen.generate(tmp_path / "cells.md")  # no file there yet: placeholder section
    committed = CELLS_DOC.read_text(encoding="utf-8")
    fresh_part, fresh_section = gen.split_confusion_section(fresh)
    committed_part, committed_section = gen.split_confusion_section(committed)
    assert fresh_section == gen.PLACEHOLDER
    assert committed_section is not None, "docs/cells.md lost its confusion-section markers"
    assert committed_part == fresh_part, (
        "docs/cells.md is out of date with knowledge.yaml / classes.yaml: "
        "run `python scripts/make_cells_doc.py`")


def test_cells_doc_covers_every_class_and_adjacent_pair():
    text = CELLS_DOC.read_text(encoding="utf-8")
    for cls in TAXONOMY.classes:
        assert f"\n### {cls.name}\n" in text, cls.id
        assert f"| `{cls.id}` | `{cls.code}` |" in text, cls.id
    for pair in TAXONOMY.adjacent_pairs:
        a, b = sorted(pair, key=CLASSES.index)
        assert f"**{TAXONOMY.cls(a).name} ↔ {TAXONOMY.cls(b).name}** (*adjacent*)" in text


def _metrics(cm_overrides: dict[tuple[str, str], int], diag: int = 10) -> dict:
    n = len(CLASSES)
    cm = [[diag if i == j else 0 for j in range(n)] for i in range(n)]
    for (true, pred), count in cm_overrides.items():
        cm[CLASSES.index(true)][CLASSES.index(pred)] = count
    return {"class_names": list(CLASSES), "confusion_matrix": cm, "accuracy": 0.9, "macro_f1": 0.85}


def test_confusion_section_lists_the_largest_confusions_first(tmp_path):
    out = tmp_path / "cells.md"
    out.write_text(CELLS_DOC.read_text(encoding="utf-8"), encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    confusions = {("myelocyte", "metamyelocyte"): 7, ("platelet", "basophil"): 3,
                  ("lymphocyte", "myeloblast"): 5, ("basophil", "eosinophil"): 1}
    metrics.write_text(json.dumps({"best": {}, "test": _metrics(confusions)}))  # `celluscan train` layout
    assert gen.main(["--out", str(out), "--metrics", str(metrics), "--top", "3"]) == 0
    text = out.read_text(encoding="utf-8")
    part, section = gen.split_confusion_section(text)
    assert part == gen.split_confusion_section(CELLS_DOC.read_text(encoding="utf-8"))[0]
    rows = [line for line in section.splitlines() if line.startswith("| [")]
    assert len(rows) == 3  # --top 3: the 1-image confusion is left out
    assert rows[0].startswith("| [Myelocyte](#myelocyte) | [Metamyelocyte](#metamyelocyte) | 7 | 41.2% | yes, adjacent |")
    assert rows[1].startswith("| [Lymphocyte](#lymphocyte) | [Myeloblast](#myeloblast) | 5 | 33.3% | yes, adjacent |")
    assert rows[2].startswith("| [Platelet](#platelet) | [Basophil](#basophil) | 3 | 23.1% | **no** |")
    assert "test split, 156 images, accuracy 0.9000, macro-F1 0.8500): 16 images are misclassified" in section
    # Regenerating without --metrics keeps the section; --check accepts the file.
    assert gen.main(["--out", str(out)]) == 0
    assert gen.split_confusion_section(out.read_text(encoding="utf-8"))[1] == section
    assert gen.main(["--out", str(out), "--check"]) == 0


def test_evaluate_layout_and_bad_metrics_files(tmp_path, capsys):
    out = tmp_path / "cells.md"
    good = tmp_path / "eval.json"
    good.write_text(json.dumps(_metrics({("band_neutrophil", "segmented_neutrophil"): 4})))
    assert gen.main(["--out", str(out), "--metrics", str(good)]) == 0
    assert "| [Band neutrophil](#band-neutrophil) | [Segmented neutrophil](#segmented-neutrophil) | 4 |" in (
        out.read_text(encoding="utf-8"))
    cases = {
        "none.json": (None, "cannot read metrics file"),
        "broken.json": ("{not json", "not valid JSON"),
        "nocm.json": (json.dumps({"test": {"accuracy": 1}}), "no confusion matrix"),
        "shape.json": (json.dumps({"confusion_matrix": [[1, 2], [3, 4]]}), "must be 14x14"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        assert gen.main(["--out", str(out), "--metrics", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err


def test_check_flags_a_stale_doc(tmp_path):
    out = tmp_path / "cells.md"
    out.write_text(CELLS_DOC.read_text(encoding="utf-8").replace("Basophil", "Basofil", 1), encoding="utf-8")
    assert gen.main(["--out", str(out), "--check"]) == 1


# ---------------------------------------------------------------------------------------------
# Links and Markdown structure of docs/*.md and README.md
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?P<text>(?:[^\[\]]|\[[^\]]*\])*)\]\((?P<target><[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+(\S+)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append((number, line))
    return out


def heading_anchors(text: str) -> set[str]:
    """GitHub-style anchors of every heading (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # links -> their text
        title = re.sub(r"[`*_]", lambda c: c.group(0) if c.group(0) == "_" else "", title)
        base = gen.anchor(title)
        count = seen.get(base, 0)
        anchors.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return anchors


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line, text, target) of every Markdown link outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        code_spans = [m.span() for m in INLINE_CODE.finditer(line)]
        for m in LINK.finditer(line):
            if any(start <= m.start() < end for start, end in code_spans):
                continue  # `[looks like a link](x)` inside inline code
            found.append((number, m.group("text"), m.group("target").strip("<>")))
        ref = REF_DEF.match(line)
        if ref:
            found.append((number, "", ref.group(1)))
    return found


def _defines(source: Path, name: str) -> bool:
    text = source.read_text(encoding="utf-8")
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]",
                     text, re.MULTILINE) is not None


def link_problems(doc: Path) -> list[str]:
    """Relative links whose file (or heading anchor, or linked Python name) does not exist."""
    problems = []
    for number, text, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        where = f"{doc.name}:{number}: [{text}]({target})"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
            continue
        if fragment and dest.suffix == ".md" and fragment not in heading_anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading with anchor #{fragment} in {dest.name}")
        code = re.fullmatch(r"`([A-Za-z_][\w.]*?)(?:\(\))?`", text)
        if code and dest.suffix == ".py" and not _defines(dest, code.group(1).rsplit(".", 1)[-1]):
            problems.append(f"{where}: {dest.name} defines no {code.group(1).rsplit('.', 1)[-1]}")
    return problems


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    problems = link_problems(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.name)
def test_markdown_is_well_formed(doc):
    text = doc.read_text(encoding="utf-8")
    lines = text.splitlines()
    fences = sum(1 for line in lines if FENCE.match(line))
    assert fences % 2 == 0, f"{doc.name}: unbalanced code fence"
    problems = []
    block: list[tuple[int, str]] = []
    for number, line in [*prose_lines(text), (len(lines) + 1, "")]:
        if line.lstrip().startswith("|"):
            block.append((number, line))
            continue
        if block:
            def cells(row: str) -> int:
                return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))
            width = cells(block[0][1])
            if len(block) < 2 or not re.fullmatch(r"\s*\|?(\s*:?-{3,}:?\s*\|)+\s*(:?-{3,}:?\s*)?", block[1][1]):
                problems.append(f"{doc.name}:{block[0][0]}: table without a |---| separator row")
            for n, row in block:
                if cells(row) != width:
                    problems.append(f"{doc.name}:{n}: {cells(row)} cells, header has {width}")
            block = []
    assert not problems, "\n".join(problems)


def test_link_checker_catches_broken_links(tmp_path):
    doc = tmp_path / "doc.md"
    (tmp_path / "here.md").write_text("# A heading\n")
    (tmp_path / "mod.py").write_text("def real():\n    pass\n")
    doc.write_text("[ok](here.md#a-heading) [bad](missing.md) [anchor](here.md#nope)\n"
                   "[`real`](mod.py) [`fake`](mod.py) `[in code](missing.md)`\n"
                   "```\n[fenced](missing2.md)\n```\n")
    found = {target for _, _, target in links(doc)}
    assert found == {"here.md#a-heading", "missing.md", "here.md#nope", "mod.py"}
    problems = link_problems(doc)
    assert len(problems) == 3, problems
    assert "missing.md does not exist" in problems[0]
    assert "no heading with anchor #nope" in problems[1]
    assert "defines no fake" in problems[2]
    assert heading_anchors((tmp_path / "here.md").read_text()) == {"a-heading"}
    assert _defines(tmp_path / "mod.py", "real") and not _defines(tmp_path / "mod.py", "fake")
