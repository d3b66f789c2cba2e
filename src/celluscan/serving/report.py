"""CSV and table views of a batch: per-image predictions and the differential count."""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from celluscan.serving.differential import Differential
from celluscan.serving.service import FileResult, prediction_to_json
from celluscan.taxonomy import TAXONOMY, Taxonomy

__all__ = ["prediction_rows", "predictions_csv", "differential_rows", "differential_csv"]

PREDICTION_COLUMNS = (
    "filename", "class", "class_name", "confidence", "group", "uncertain", "uncertain_reason",
    "group_answer", "unfamiliar", "unfamiliar_score", "error",
)


def prediction_rows(results: Sequence[FileResult], with_probabilities: bool = False,
                    taxonomy: Taxonomy = TAXONOMY) -> list[dict[str, Any]]:
    """One flat dict per file (errors included), in upload order."""
    rows = []
    for r in results:
        row: dict[str, Any] = {k: "" for k in PREDICTION_COLUMNS}
        row["filename"] = r.filename
        if r.ok:
            j = prediction_to_json(r.prediction)
            row.update({
                "class": j["class"], "class_name": j["class_name"],
                "confidence": round(j["confidence"], 4), "group": j["group_name"],
                "uncertain": j["uncertain"], "uncertain_reason": j["uncertain_reason"] or "",
                "group_answer": j["group_answer"] or "", "unfamiliar": j["unfamiliar"],
                "unfamiliar_score": "" if j["unfamiliar_score"] is None else round(j["unfamiliar_score"], 4),
            })
            if with_probabilities:
                row.update({f"p_{c}": round(j["probabilities"].get(c, 0.0), 6) for c in taxonomy.ids})
        else:
            row["error"] = f"{r.error.code}: {r.error.message}"
            if with_probabilities:
                row.update({f"p_{c}": "" for c in taxonomy.ids})
        rows.append(row)
    return rows


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _neutralise(row.get(k, "")) for k in columns})
    return buf.getvalue()


def _neutralise(value: Any) -> Any:
    """Stop spreadsheet formula injection through uploaded file names."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def predictions_csv(results: Sequence[FileResult], taxonomy: Taxonomy = TAXONOMY) -> str:
    columns = list(PREDICTION_COLUMNS) + [f"p_{c}" for c in taxonomy.ids]
    return _csv(prediction_rows(results, with_probabilities=True, taxonomy=taxonomy), columns)


def differential_rows(diff: Differential, taxonomy: Taxonomy = TAXONOMY) -> list[dict[str, Any]]:
    """Group rows (with their total) followed by their member classes, in taxonomy order."""
    rows = []
    for g in taxonomy.group_names():
        rows.append({"level": "group", "id": g, "name": taxonomy.groups[g].name,
                     "count": diff.group_counts[g], "percent": round(diff.group_percentages[g], 2)})
        for c in taxonomy.classes:
            if c.group == g:
                rows.append({"level": "class", "id": c.id, "name": c.name,
                             "count": diff.counts[c.id], "percent": round(diff.percentages[c.id], 2)})
    return rows


def differential_csv(diff: Differential, taxonomy: Taxonomy = TAXONOMY) -> str:
    rows = differential_rows(diff, taxonomy)
    rows.append({"level": "total", "id": "", "name": "Classified images", "count": diff.total,
                 "percent": 100.0 if diff.total else 0.0})
    for f in diff.flags:
        rows.append({"level": f"flag:{f.severity}", "id": f.class_id, "name": f.display_text(),
                     "count": f.count, "percent": round(f.percent, 2)})
    return _csv(rows, ("level", "id", "name", "count", "percent"))
