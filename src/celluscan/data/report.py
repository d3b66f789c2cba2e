"""The ingest report: ``report.json`` (complete, machine-readable), ``report.md`` (for
people) and ``class_counts.png`` (images per class and split)."""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from celluscan import __version__
from celluscan.data.atomic import atomic_write_bytes, atomic_write_text
from celluscan.data.manifest import SPLITS, ManifestRow
from celluscan.taxonomy import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from celluscan.data.ingest import IngestConfig
    from celluscan.data.scan import Candidate, ScanResult

__all__ = ["build_report", "write_report", "render_markdown"]

_MD_LIST_LIMIT = 200  # longer lists are cut in report.md (report.json has everything)


def _per_class(labels) -> dict[str, int]:
    c = Counter(labels)
    return {k: int(c.get(k, 0)) for k in CLASSES}


def _sorted_counts(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def build_report(
    config: "IngestConfig",
    scan: "ScanResult",
    rejected: Sequence[tuple["Candidate", str]],
    exact_duplicates: list[dict],
    rows: Sequence[ManifestRow],
    pairs: np.ndarray,
    stats: dict,
) -> dict:
    """Everything the ingest saw and decided, as a JSON-ready dict (deterministic)."""
    cands = scan.candidates
    group_members: dict[int, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        group_members[r.group].append(r)
    near_groups = [
        {
            "group": g,
            "size": len(m),
            "split": m[0].split,
            "labels": sorted({r.label for r in m}),
            "mixed_labels": len({r.label for r in m}) > 1,
            "files": [r.path for r in m],
        }
        for g, m in sorted(group_members.items())
        if len(m) > 1
    ]
    dropped = sum(len(d["files"]) - (0 if d["conflicting_labels"] else 1) for d in exact_duplicates)
    class_by_source: dict[str, dict[str, int]] = {}
    for label in CLASSES:
        per = Counter(r.source for r in rows if r.label == label)
        class_by_source[label] = dict(sorted(per.items()))
    fill = config.fill if isinstance(config.fill, str) else list(config.fill)
    return {
        "celluscan_version": __version__,
        "sources": [str(Path(s).absolute()) for s in config.sources],
        "params": {
            "label_map": config.label_map,
            "skip_unknown": config.skip_unknown,
            "image_size": config.image_size,
            "pad_fill": fill,
            "seed": config.seed,
            "fractions": list(config.fractions),
            "near_dup_threshold": config.near_dup_threshold,
            "near_dup_hash": "64-bit DCT pHash, Hamming distance",
            "limits": {
                "max_bytes": config.limits.max_bytes,
                "max_pixels": config.limits.max_pixels,
                "min_side": config.limits.min_side,
            },
        },
        "classes": list(CLASSES),
        "totals": {
            "found": len(cands),
            "rejected": len(rejected),
            "exact_duplicate_sets": len(exact_duplicates),
            "exact_duplicates_dropped": dropped,
            "kept": len(rows),
            "near_duplicate_pairs": int(len(pairs)),
            "near_duplicate_groups": len(near_groups),
            "unknown_label_files": sum(len(v) for v in scan.unknown.values()),
            "skipped_by_label_map": len(scan.skipped_by_map),
            "ignored_files": len(scan.ignored),
        },
        "counts": {
            "before": _per_class(c.label for c in cands),
            "rejected": _per_class(c.label for c, _ in rejected),
            "after": _per_class(r.label for r in rows),
            "by_split": {s: _per_class(r.label for r in rows if r.split == s) for s in SPLITS},
        },
        "counts_by_source": {
            "before": _sorted_counts(c.source for c in cands),
            "after": _sorted_counts(r.source for r in rows),
        },
        "class_by_source_after": class_by_source,
        "exact_duplicates": exact_duplicates,
        "near_duplicate_groups": near_groups,
        "rejected": [{"path": c.path, "label": c.label, "reason": reason} for c, reason in rejected],
        "unknown_labels": {k: sorted(v) for k, v in sorted(scan.unknown.items())},
        "skipped_by_label_map": [{"path": p, "raw_label": raw} for p, raw in scan.skipped_by_map],
        "ignored_files": scan.ignored,
        "symlinked_dirs_not_followed": scan.symlinked_dirs,
        "walk_errors": [{"path": p, "reason": r} for p, r in scan.walk_errors],
        "stats": stats,
    }


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _bullets(items: list[str]) -> list[str]:
    lines = [f"- {_md_escape(i)}" for i in items[:_MD_LIST_LIMIT]]
    if len(items) > _MD_LIST_LIMIT:
        lines.append(f"- ... and {len(items) - _MD_LIST_LIMIT} more (see report.json)")
    return lines


def render_markdown(report: dict) -> str:
    """``report.md``: summary, per-class and per-source tables, every problem found."""
    t, c = report["totals"], report["counts"]
    lines = [
        "# Ingest report",
        "",
        f"Sources: {', '.join(f'`{s}`' for s in report['sources'])}  ",
        f"Kept **{t['kept']}** of {t['found']} labelled image files: {t['rejected']} rejected, "
        f"{t['exact_duplicates_dropped']} exact duplicates dropped, {t['unknown_label_files']} "
        f"with unknown labels, {t['skipped_by_label_map']} skipped by the label map, "
        f"{t['ignored_files']} non-image or hidden files ignored.  ",
        f"Near-duplicate groups (pHash Hamming distance <= {report['params']['near_dup_threshold']}): "
        f"{t['near_duplicate_groups']} ({t['near_duplicate_pairs']} pairs); each group stays in one split.",
        "",
        "![images per class and split](class_counts.png)",
        "",
        "## Per class",
        "",
        "| class | before | rejected | after | " + " | ".join(SPLITS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(SPLITS),
    ]
    for k in report["classes"]:
        split_cells = " | ".join(str(c["by_split"][s][k]) for s in SPLITS)
        lines.append(f"| {k} | {c['before'][k]} | {c['rejected'][k]} | {c['after'][k]} | {split_cells} |")
    totals_split = " | ".join(str(sum(c["by_split"][s].values())) for s in SPLITS)
    lines.append(
        f"| **total** | {sum(c['before'].values())} | {sum(c['rejected'].values())} | "
        f"{sum(c['after'].values())} | {totals_split} |"
    )
    lines += ["", "## Per source", "", "| source | before | after |", "|---|---:|---:|"]
    by_src = report["counts_by_source"]
    for s in sorted(set(by_src["before"]) | set(by_src["after"])):
        lines.append(f"| {_md_escape(s)} | {by_src['before'].get(s, 0)} | {by_src['after'].get(s, 0)} |")
    stats = report["stats"]
    lines += [
        "",
        "## Channel statistics (train split, 0-1 scale)",
        "",
        f"mean {', '.join(f'{v:.4f}' for v in stats['mean'])}; "
        f"std {', '.join(f'{v:.4f}' for v in stats['std'])} "
        f"({stats['num_images']} images at {stats['image_size']} px)",
    ]
    lines += ["", f"## Rejected files ({len(report['rejected'])})", ""]
    lines += _bullets([f"`{r['path']}`: {r['reason']}" for r in report["rejected"]]) or ["None."]
    lines += ["", f"## Exact duplicates ({len(report['exact_duplicates'])} sets)", ""]
    lines += _bullets(
        [
            f"{d['action']}: labels {', '.join(d['labels'])}; files "
            + ", ".join(f"`{f}`" for f in d["files"])
            for d in report["exact_duplicates"]
        ]
    ) or ["None."]
    lines += ["", f"## Near-duplicate groups ({len(report['near_duplicate_groups'])})", ""]
    lines += _bullets(
        [
            f"group {g['group']} ({g['size']} images, {g['split']}"
            + (", mixed labels: look-alike cells or a label conflict, check" if g["mixed_labels"] else "")
            + f"): {', '.join(g['labels'])}: "
            + ", ".join(f"`{Path(f).name}`" for f in g["files"])
            for g in report["near_duplicate_groups"]
        ]
    ) or ["None."]
    lines += ["", f"## Unknown labels ({len(report['unknown_labels'])})", ""]
    lines += _bullets(
        [
            f"`{k}`: {len(v)} file(s), e.g. " + ", ".join(f"`{f}`" for f in v[:3])
            for k, v in report["unknown_labels"].items()
        ]
    ) or ["None."]
    if report["skipped_by_label_map"]:
        lines += ["", f"## Skipped by the label map ({len(report['skipped_by_label_map'])})", ""]
        lines += _bullets([f"`{s['path']}` ({s['raw_label']})" for s in report["skipped_by_label_map"]])
    if report["symlinked_dirs_not_followed"]:
        lines += ["", "## Symlinked folders (not followed)", ""]
        lines += _bullets([f"`{p}`" for p in report["symlinked_dirs_not_followed"]])
    if report["walk_errors"]:
        lines += ["", "## Folders that could not be read", ""]
        lines += _bullets([f"`{e['path']}`: {e['reason']}" for e in report["walk_errors"]])
    return "\n".join(lines) + "\n"


def _plot_class_counts(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    bottom = np.zeros(len(classes))
    for split in SPLITS:
        values = np.array([report["counts"]["by_split"][split][k] for k in classes])
        ax.bar(classes, values, bottom=bottom, label=split)
        bottom += values
    ax.set_ylabel("images")
    ax.set_title(f"Images per class and split ({report['totals']['kept']} kept)")
    ax.tick_params(axis="x", labelrotation=60)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, report: dict) -> None:
    """Write report.json, report.md and class_counts.png into ``out`` atomically."""
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_bytes(out / "class_counts.png", _plot_class_counts(report))
