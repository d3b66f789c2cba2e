"""Generate docs/cells.md from the knowledge cards and the taxonomy, so the doc and the app agree.

Sources (the same files the web app and the API read):

* ``src/celluscan/serving/knowledge.yaml`` through :func:`celluscan.serving.knowledge.load_knowledge`
  (summaries, morphology, look-alikes, reference ranges; rendered with ``render_card_markdown``,
  the function the web UI uses);
* ``src/celluscan/taxonomy/classes.yaml`` through :data:`celluscan.taxonomy.TAXONOMY` (ids,
  codes, lineage groups, biologically adjacent pairs).

The section "What our confusion matrix says" comes from a metrics file, when one is given::

    python scripts/make_cells_doc.py                                  # knowledge part only
    python scripts/make_cells_doc.py --metrics runs/RUN/metrics.json  # + the confusion section
    python scripts/make_cells_doc.py --check                          # exit 1 if docs/cells.md is stale

``--metrics`` accepts the ``metrics.json`` of ``celluscan evaluate`` (confusion matrix at the top
level) or of ``celluscan train`` (under ``test``). Without ``--metrics`` the confusion section
already in the output file is kept as it is (a placeholder when there is none), so regenerating
after a knowledge edit never loses it. The section sits between two HTML comment markers; see
:func:`split_confusion_section`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from celluscan.data.atomic import atomic_write_text
from celluscan.serving.knowledge import Knowledge, load_knowledge, render_card_markdown
from celluscan.taxonomy import CLASSES, TAXONOMY, Taxonomy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "cells.md"
BEGIN = "<!-- BEGIN confusion section: written by scripts/make_cells_doc.py --metrics -->"
END = "<!-- END confusion section -->"
PLACEHOLDER = (
    "Not filled in yet. It is written from a model's evaluation with\n"
    "`python scripts/make_cells_doc.py --metrics RUN/metrics.json` (the `metrics.json` of\n"
    "`celluscan train` or `celluscan evaluate`): the largest off-diagonal cells of the confusion\n"
    "matrix, and whether each is one of the look-alike pairs above.\n"
)

# The granulocytic maturation series, oldest last; checked against the taxonomy on import.
MATURATION = ("myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "band_neutrophil",
              "segmented_neutrophil")
assert all(c in CLASSES for c in MATURATION), "MATURATION names a class the taxonomy lacks"

THEMES = (
    ("precursors", "Granulocytic precursors and the maturation series"),
    ("neutrophils", "Band, segmented and unsubtyped neutrophils"),
    ("eosinophil", "Eosinophil vs neutrophil"),
    ("round", "Round nuclei: blasts, lymphocytes, monocytes, erythroblasts"),
    ("other", "Other look-alikes"),
)


class MetricsFileError(ValueError):
    """The metrics file cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# Markdown helpers
# ------------------------------------------------------------------------------------------------


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in heading.strip().lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def class_link(taxonomy: Taxonomy, class_id: str) -> str:
    name = taxonomy.cls(class_id).name
    return f"[{name}](#{anchor(name)})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------------------------
# Knowledge part
# ------------------------------------------------------------------------------------------------


def look_alike_pairs(knowledge: Knowledge, taxonomy: Taxonomy) -> list[tuple[str, str]]:
    """Every unordered pair of classes that the taxonomy calls adjacent or a card names as a
    look-alike, as (a, b) in canonical order, sorted canonically."""
    pairs = {tuple(sorted(p, key=CLASSES.index)) for p in taxonomy.adjacent_pairs}
    for card in knowledge.cards.values():
        for la in card.look_alikes:
            if la.class_id:
                pairs.add(tuple(sorted((card.id, la.class_id), key=CLASSES.index)))
    return sorted(pairs, key=lambda p: (CLASSES.index(p[0]), CLASSES.index(p[1])))


def theme_of(a: str, b: str, taxonomy: Taxonomy) -> str:
    groups = {taxonomy.group_of(a), taxonomy.group_of(b)}
    if groups == {"neutrophil"}:
        return "neutrophils"
    if groups == {"eosinophil", "neutrophil"}:
        return "eosinophil"
    if groups & {"lymphoid", "monocytic", "erythroid"}:
        return "round"
    if groups & {"granulocytic_precursor", "blast"} and groups <= {"granulocytic_precursor", "blast", "neutrophil"}:
        return "precursors"
    return "other"


def _how_to_tell(knowledge: Knowledge, a: str, b: str) -> list[tuple[str, str]]:
    """(card name, text) for each card that says how to tell ``a`` from ``b``."""
    found = []
    for owner, other in ((a, b), (b, a)):
        card = knowledge.card(owner)
        for la in card.look_alikes:
            if la.class_id == other:
                found.append((card.name, la.how_to_tell))
    return found


def render_overview(knowledge: Knowledge, taxonomy: Taxonomy) -> list[str]:
    lines = ["## The classes at a glance", "",
             "Index order is the order of the model's outputs, of CSV columns and of confusion "
             "matrices (alphabetical by id).", "",
             "| # | class | id | file code | lineage group | lineage | adult reference range |",
             "|---:|---|---|---|---|---|---|"]
    for cls in taxonomy.classes:
        group = taxonomy.groups[cls.group]
        rr = knowledge.card(cls.id).reference_range.describe()
        lines.append(f"| {cls.index} | {class_link(taxonomy, cls.id)} | `{cls.id}` | `{cls.code}` | "
                     f"{group.name} | {group.lineage} | {_cell(rr)} |")
    return lines + [""]


def render_lineages(taxonomy: Taxonomy) -> list[str]:
    lines = ["## Lineages", "",
             "Blood cells come from a few lineages. Each CelluScan class belongs to one lineage "
             "group; when the model is torn between two classes of the same group (or two "
             "biologically adjacent classes) the app reports the group instead of a guess.", ""]
    lineages: dict[str, list] = {}
    for group in taxonomy.groups.values():
        lineages.setdefault(group.lineage, []).append(group)
    for lineage, groups in lineages.items():
        lines.append(f"- **{lineage.capitalize()}**")
        for group in groups:
            members = ", ".join(class_link(taxonomy, c) for c in group.members)
            lines.append(f"  - {group.name} (`{group.id}`): {members}")
    chain = " → ".join(class_link(taxonomy, c) for c in MATURATION)
    lines += ["",
              "Granulocytes mature in the bone marrow through a continuous series, and every "
              f"step is a CelluScan class: {chain}. "
              f"{class_link(taxonomy, 'immature_granulocyte')} is the PBC dataset's label for "
              "promyelocytes, myelocytes and metamyelocytes that were not sub-typed, and "
              f"{class_link(taxonomy, 'neutrophil')} its label for mature neutrophils not "
              "sub-typed as band or segmented: both overlap other classes by definition.", ""]
    return lines


def render_look_alikes(knowledge: Knowledge, taxonomy: Taxonomy) -> list[str]:
    pairs = look_alike_pairs(knowledge, taxonomy)
    adjacent = sum(1 for a, b in pairs if frozenset((a, b)) in taxonomy.adjacent_pairs)
    lines = ["## Look-alike pairs", "",
             f"{len(pairs)} pairs of classes are easy to confuse: {adjacent} are listed as "
             "biologically adjacent in `classes.yaml` (marked *adjacent*: a model torn between "
             "them reports a real morphological continuum, and the app flags the answer as "
             "uncertain and gives the lineage group), the rest are named as look-alikes by a "
             "knowledge card. The text under each pair is the card's own.", ""]
    by_theme: dict[str, list[tuple[str, str]]] = {}
    for a, b in pairs:
        by_theme.setdefault(theme_of(a, b, taxonomy), []).append((a, b))
    for key, title in THEMES:
        if key not in by_theme:
            continue
        lines += [f"### {title}", ""]
        for a, b in by_theme[key]:
            mark = " (*adjacent*)" if frozenset((a, b)) in taxonomy.adjacent_pairs else ""
            lines.append(f"- **{taxonomy.cls(a).name} ↔ {taxonomy.cls(b).name}**{mark}")
            texts = _how_to_tell(knowledge, a, b)
            if not texts:
                lines.append("  - Neither card says yet how to tell these two apart.")
            for owner, text in texts:
                lines.append(f"  - *{owner} card:* {text}")
        lines.append("")
    return lines


def render_cards(knowledge: Knowledge) -> list[str]:
    lines = ["## Cell cards", "",
             "The same cards the web app shows beside a prediction.", ""]
    for card in knowledge.cards.values():
        lines += [render_card_markdown(card, heading_level=3).rstrip(), ""]
    return lines


def render_document(knowledge: Knowledge, taxonomy: Taxonomy, confusion_body: str) -> str:
    """The whole of docs/cells.md; ``confusion_body`` fills the confusion section."""
    sections = ["The classes at a glance", "Lineages", "Look-alike pairs", "Cell cards",
                "What our confusion matrix says"]
    lines = [
        "<!-- Generated by scripts/make_cells_doc.py from src/celluscan/serving/knowledge.yaml and "
        "src/celluscan/taxonomy/classes.yaml. Do not edit by hand: edit the YAML files and run "
        "`python scripts/make_cells_doc.py`. -->",
        "",
        "# The 14 cell types",
        "",
        f"> {knowledge.notice}",
        "",
        f"CelluScan sorts a single-cell image into one of {len(taxonomy.classes)} classes. This page "
        "is generated from the same two files the app reads, "
        "[knowledge.yaml](../src/celluscan/serving/knowledge.yaml) (the knowledge cards) and "
        "[classes.yaml](../src/celluscan/taxonomy/classes.yaml) (the taxonomy), so the doc and the "
        "app cannot disagree.",
        "",
        *[f"- [{s}](#{anchor(s)})" for s in sections],
        "",
        *render_overview(knowledge, taxonomy),
        *render_lineages(taxonomy),
        *render_look_alikes(knowledge, taxonomy),
        *render_cards(knowledge),
        "## What our confusion matrix says",
        "",
        BEGIN,
        "",
        confusion_body.strip(),
        "",
        END,
    ]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# Confusion section
# ------------------------------------------------------------------------------------------------


def split_confusion_section(text: str) -> tuple[str, str | None]:
    """(the document with the section's body replaced by a fixed token, the body or None).

    The first part is what :func:`render_document` derives from the knowledge and taxonomy
    only, so two documents with equal first parts agree on everything but the metrics."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return text, None
    body = text[start + len(BEGIN):end]
    return text[:start + len(BEGIN)] + "\n@@CONFUSION@@\n" + text[end:], body.strip() + "\n"


def _confusion_source(doc: Any, path: str) -> tuple[Mapping, str]:
    if not isinstance(doc, Mapping):
        raise MetricsFileError(f"{path}: expected a JSON object")
    if "confusion_matrix" in doc:
        return doc, "evaluation"
    test = doc.get("test")
    if isinstance(test, Mapping) and "confusion_matrix" in test:
        return test, "test split"
    raise MetricsFileError(f"{path}: no confusion matrix (looked for 'confusion_matrix' at the top "
                           "level and under 'test')")


def read_metrics(path: str | os.PathLike) -> tuple[Mapping, str]:
    """The metrics dict holding a confusion matrix, and what it describes."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MetricsFileError(f"{path}: cannot read metrics file: {e.strerror or e}") from None
    except ValueError as e:
        raise MetricsFileError(f"{path}: not valid JSON: {e}") from None
    metrics, what = _confusion_source(doc, str(path))
    names = list(metrics.get("class_names") or CLASSES)
    cm = metrics["confusion_matrix"]
    if (not isinstance(cm, list) or len(cm) != len(names)
            or any(not isinstance(r, list) or len(r) != len(names) for r in cm)):
        raise MetricsFileError(f"{path}: the confusion matrix must be {len(names)}x{len(names)} "
                               f"(one row and column per class name)")
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise MetricsFileError(f"{path}: class names {unknown} are not CelluScan classes")
    try:
        matrix = [[int(v) for v in row] for row in cm]
    except (TypeError, ValueError):
        raise MetricsFileError(f"{path}: the confusion matrix must hold counts") from None
    if any(v < 0 for row in matrix for v in row):
        raise MetricsFileError(f"{path}: the confusion matrix has negative counts")
    return {**metrics, "class_names": names, "confusion_matrix": matrix}, what


def largest_confusions(matrix: Sequence[Sequence[int]], names: Sequence[str],
                       top: int = 10) -> list[tuple[str, str, int, float]]:
    """The ``top`` largest off-diagonal cells as (true, predicted, count, share of the true
    class's images), largest count first (ties: larger share, then canonical order)."""
    rows = []
    for i, row in enumerate(matrix):
        total = sum(row)
        for j, count in enumerate(row):
            if i != j and count > 0:
                rows.append((names[i], names[j], int(count), count / total))
    rows.sort(key=lambda r: (-r[2], -r[3], CLASSES.index(r[0]), CLASSES.index(r[1])))
    return rows[:top]


def render_confusion_section(metrics: Mapping, what: str, source: str, knowledge: Knowledge,
                             taxonomy: Taxonomy, top: int = 10) -> str:
    names, matrix = metrics["class_names"], metrics["confusion_matrix"]
    n = sum(sum(r) for r in matrix)
    errors = n - sum(matrix[i][i] for i in range(len(names)))
    confusions = largest_confusions(matrix, names, top)
    look_alike = {frozenset(p) for p in look_alike_pairs(knowledge, taxonomy)}
    headline = f"From `{source}` ({what}, {n} images"
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        if isinstance(metrics.get(key), (int, float)):
            headline += f", {label} {metrics[key]:.4f}"
    lines = [headline + f"): {errors} images are misclassified. The {len(confusions)} largest "
             "off-diagonal cells of the confusion matrix (rows: true class, columns: predicted):", "",
             "| true class | predicted as | images | share of the true class | look-alike pair? |",
             "|---|---|---:|---:|---|"]
    covered = 0
    for true, pred, count, share in confusions:
        pair = frozenset((true, pred))
        if pair in taxonomy.adjacent_pairs:
            kind = "yes, adjacent"
        elif pair in look_alike:
            kind = "yes, named by a card"
        elif taxonomy.group_of(true) == taxonomy.group_of(pred):
            kind = "same lineage group"
        else:
            kind = "**no**"
        covered += kind != "**no**"
        lines.append(f"| {class_link(taxonomy, true)} | {class_link(taxonomy, pred)} | {count} | "
                     f"{share:.1%} | {kind} |")
    in_top = sum(c for _, _, c, _ in confusions)
    lines += ["",
              f"These {len(confusions)} cells hold {in_top} of the {errors} errors "
              f"({in_top / max(errors, 1):.0%}); {covered} of them are look-alike pairs or share a "
              "lineage group, where the cards above say what to look at. A confusion marked "
              "**no** is not explained by morphology and deserves a look at the images "
              "(a labelling problem, or a shortcut such as image size or scanner)."]
    recalls = []
    for i, name in enumerate(names):
        total = sum(matrix[i])
        if total:
            recalls.append((matrix[i][i] / total, name, total))
    recalls.sort()
    worst = ", ".join(f"{class_link(taxonomy, name)} {r:.1%} of {total}" for r, name, total in recalls[:3])
    lines += ["", f"Lowest recall: {worst}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def generate(out: Path, metrics_path: str | None = None, top: int = 10,
             knowledge: Knowledge | None = None, taxonomy: Taxonomy = TAXONOMY) -> str:
    """The document text for ``out`` (existing confusion section kept unless ``metrics_path``)."""
    knowledge = knowledge or load_knowledge()
    if metrics_path is not None:
        metrics, what = read_metrics(metrics_path)
        body = render_confusion_section(metrics, what, str(metrics_path), knowledge, taxonomy, top)
    else:
        body = PLACEHOLDER
        if out.is_file():
            _, existing = split_confusion_section(out.read_text(encoding="utf-8"))
            body = existing or PLACEHOLDER
    return render_document(knowledge, taxonomy, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/cells.md from knowledge.yaml and classes.yaml.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file (default docs/cells.md)")
    parser.add_argument("--metrics", metavar="METRICS.json",
                        help="fill 'What our confusion matrix says' from this metrics.json")
    parser.add_argument("--top", type=int, default=10, help="confusions listed (default 10)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the knowledge part of --out is out of date")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        text = generate(args.out, args.metrics, args.top)
    except MetricsFileError as e:
        print(f"make_cells_doc: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if split_confusion_section(current)[0] != split_confusion_section(text)[0]:
            print(f"{args.out} is out of date: run `python scripts/make_cells_doc.py`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
