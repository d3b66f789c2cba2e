"""The Gradio web UI: single-cell view, smear (batch) view and the cell guide.

Built on the same :class:`ModelService`, upload rules and differential as the REST API.
Uploaded images are decoded only by ``data.imageio.load_image_bytes`` (the image input hands
us the uploaded file's bytes, never a PIL image decoded by Gradio). Everything shown is
HTML-escaped; files offered for download are written by the server, under server-chosen
names, in a private temporary folder.
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from celluscan.serving.offline import disable_gradio_telemetry

disable_gradio_telemetry()  # before gradio is imported

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from celluscan.data.atomic import atomic_write_bytes, atomic_write_text
from celluscan.data.imageio import IMAGE_SUFFIXES, ImageLoadError, load_image_bytes
from celluscan.serving.differential import Differential, compute_differential, plot_differential_png
from celluscan.serving.knowledge import Knowledge, render_card_markdown
from celluscan.serving.report import differential_csv, differential_rows, prediction_rows, predictions_csv
from celluscan.serving.service import FileResult, ModelService, ServiceTimeout
from celluscan.serving.uploads import (
    TooManyFilesError,
    Upload,
    UploadError,
    collect_uploads,
    sanitise_filename,
)
from celluscan.taxonomy import TAXONOMY

__all__ = ["build_ui", "offline_theme", "UI_CSS", "resolve_samples_dir", "sample_images",
           "render_prediction_html", "render_flags_html", "UNFAMILIAR_MESSAGE"]

UNFAMILIAR_MESSAGE = (
    "This image looks unlike the images the model was trained on; the result is unreliable."
)
SYSTEM_FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
                "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
UI_TIMEOUT_FACTOR = 5  # a smear in the UI may take longer than one API request

UI_CSS = """
.cs-banner{border-radius:8px;padding:.6rem .8rem;margin:.4rem 0;font-weight:600}
.cs-banner.unfamiliar{background:#fde2e1;border:1px solid #e5484d;color:#7f1d1d}
.cs-banner.uncertain{background:#fff4d6;border:1px solid #f5a524;color:#7a4b00}
.cs-banner.error{background:#fde2e1;border:1px solid #e5484d;color:#7f1d1d}
.cs-headline{font-size:1.5rem;font-weight:700;margin:.3rem 0}
.cs-sub{color:#4b5563;margin-bottom:.6rem}
.cs-top3{width:100%;border-collapse:collapse}
.cs-top3 td{padding:.25rem .4rem;vertical-align:middle;border:none !important}
.cs-bar{background:#e5e7eb;border-radius:4px;height:.8rem;width:100%}
.cs-bar>div{background:#2563eb;border-radius:4px;height:.8rem}
.cs-pct{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cs-flag{border-radius:6px;padding:.4rem .6rem;margin:.3rem 0}
.cs-flag.urgent{background:#fde2e1;border-left:5px solid #e5484d}
.cs-flag.review{background:#fff4d6;border-left:5px solid #f5a524}
.cs-flag.info{background:#e6f0ff;border-left:5px solid #2563eb}
.cs-flag.unreliable{background:#f3f4f6;border-left:5px solid #6b7280;color:#374151}
.cs-notice{font-size:.85rem;color:#6b7280}
"""


def offline_theme() -> gr.themes.Base:
    """The default theme with system fonts only: nothing is fetched from a font CDN."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


class UploadedImage(gr.Image):
    """``gr.Image`` for input that hands over the uploaded file itself, undecoded.

    Stock ``gr.Image`` opens uploads with PIL before our code sees them; this one returns the
    path of the file Gradio stored (or the bytes of a pasted data URL) so that the only
    decoder is ``load_image_bytes``. Renders with the stock image front end.
    """

    is_template = True

    def preprocess(self, payload: Any) -> tuple[str, bytes] | None:
        if payload is None:
            return None
        name = sanitise_filename(getattr(payload, "orig_name", None), fallback="pasted image")
        url = getattr(payload, "url", None) or ""
        if url.startswith("data:"):
            _, _, encoded = url.partition(",")
            try:
                return name, base64.b64decode(encoded, validate=False)
            except ValueError:
                return name, b""
        if payload.path is None:
            return None
        return name, Path(payload.path).read_bytes() if Path(payload.path).is_file() else b""


def resolve_samples_dir(samples_dir: str | Path | None = None) -> Path | None:
    """The folder of bundled example images (one sub-folder per class), or None."""
    if samples_dir is not None:
        p = Path(samples_dir)
        return p.resolve() if p.is_dir() else None
    try:
        p = Path(str(resources.files("celluscan").joinpath("assets", "samples")))
    except (ModuleNotFoundError, TypeError):
        return None
    return p.resolve() if p.is_dir() else None


def sample_images(samples_dir: Path | None) -> list[tuple[str, Path]]:
    """(class id, first image) for each class with a sample, in canonical order."""
    if samples_dir is None:
        return []
    out = []
    for cid in TAXONOMY.ids:
        folder = samples_dir / cid
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out.append((cid, files[0]))
    return out


class _OutputStore:
    """Server-owned folder for downloads and charts; files older than an hour are removed."""

    def __init__(self, max_age_s: float = 3600.0):
        self.root = Path(tempfile.mkdtemp(prefix="celluscan-ui-"))
        self.max_age_s = max_age_s

    def _prune(self) -> None:
        cutoff = time.time() - self.max_age_s
        for p in self.root.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except OSError:
                pass

    def write(self, stem: str, suffix: str, data: bytes | str) -> str:
        self._prune()
        # A fresh sub-folder per file keeps the download name readable and unique.
        folder = self.root / uuid.uuid4().hex[:16]
        target = folder / f"{stem}{suffix}"
        if isinstance(data, str):
            atomic_write_text(target, data)
        else:
            atomic_write_bytes(target, data)
        return str(target)


# ------------------------------------------------------------------------------ rendering


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def _banner(kind: str, text: str) -> str:
    return f"<div class='cs-banner {kind}' role='status'>{html.escape(text)}</div>"


def render_prediction_html(result: FileResult) -> str:
    """The single-cell result: banners, headline (or group answer when unsure), top-3 bars."""
    e = html.escape
    if not result.ok:
        return _banner("error", f"{result.filename}: {result.error.message}")
    p = result.prediction
    name = TAXONOMY.cls(p.label).name
    parts = ["<div class='cs-result'>"]
    if p.unfamiliar:
        parts.append(_banner("unfamiliar", UNFAMILIAR_MESSAGE))
    if p.uncertain:
        reason = f" ({p.uncertain_reason})" if p.uncertain_reason else ""
        parts.append(_banner("uncertain", f"The model is unsure about this cell{reason}. "
                                          "Review recommended."))
        headline = p.group_answer or f"{p.group_name}: most likely {name.lower()}, review recommended"
        parts.append(f"<div class='cs-headline'>{e(headline)}</div>")
        parts.append(f"<div class='cs-sub'>Lineage group: {e(p.group_name)} · top class "
                     f"{e(name)} at {_pct(p.confidence)}</div>")
    else:
        parts.append(f"<div class='cs-headline'>{e(name)}</div>")
        parts.append(f"<div class='cs-sub'>Lineage group: {e(p.group_name)} · calibrated "
                     f"probability {_pct(p.confidence)}</div>")
    parts.append("<table class='cs-top3' aria-label='Top 3 classes'>")
    for cid, prob in list(p.top_k)[:3]:
        width = max(0.0, min(100.0, 100 * float(prob)))
        parts.append(
            f"<tr class='cs-top3-row'><td>{e(TAXONOMY.cls(cid).name)}</td>"
            f"<td style='width:55%'><div class='cs-bar'><div style='width:{width:.1f}%'></div></div></td>"
            f"<td class='cs-pct'>{_pct(float(prob))}</td></tr>"
        )
    parts.append("</table>")
    score = p.unfamiliar_score
    if score is not None and math.isfinite(float(score)):
        note = getattr(p, "unfamiliar_note", "")
        parts.append(f"<div class='cs-notice'>Unfamiliarity score: {float(score):.2f}"
                     f"{' (' + e(note) + ')' if note else ''}</div>")
    parts.append("</div>")
    return "".join(parts)


def render_flags_html(diff: Differential, knowledge: Knowledge) -> str:
    e = html.escape
    if diff.total == 0:
        return _banner("error", "No image could be classified.")
    if not diff.flags:
        return "<div class='cs-flag info'>No flags raised by the knowledge-card rules.</div>"
    parts = []
    for f in diff.flags:
        label = knowledge.severities[f.severity].label
        parts.append(f"<div class='cs-flag {e(f.severity)}'><b>{e(label)}:</b> {e(f.display_text())}</div>")
    return "".join(parts)


# ------------------------------------------------------------------------------ handlers


def _unreadable_upload(path: str, err: OSError) -> Upload:
    """The error row for an uploaded file the server cannot open (never a crash)."""
    if isinstance(err, FileNotFoundError):
        reason = "file not found (the upload is no longer on the server; upload it again)"
    else:
        reason = f"cannot read the uploaded file: {err.strerror or err}"
    return Upload(sanitise_filename(Path(path).name), error=UploadError("unreadable", reason))


class _Handlers:
    def __init__(self, service: ModelService, knowledge: Knowledge):
        self.service = service
        self.kb = knowledge
        self.store = _OutputStore()
        self.ui_timeout_s = service.limits.inference_timeout_s * UI_TIMEOUT_FACTOR

    def cell(self, upload: tuple[str, bytes] | None):
        if upload is None:
            return _banner("error", "Upload, paste or drop a cell image first."), None, ""
        name, data = upload
        limits = self.service.limits
        if len(data) > limits.max_file_bytes:
            return _banner("error", f"{name}: file is {len(data):,} bytes, over the limit of "
                                    f"{limits.max_file_bytes:,}"), None, ""
        try:
            image = load_image_bytes(data, name, limits.image_limits())
        except ImageLoadError as err:
            return _banner("error", f"{err.source}: {err.reason}"), None, ""
        try:
            result = self.service.predict_image(image, name)
        except ServiceTimeout as err:
            return _banner("error", f"The server is busy: {err}. Try again."), None, ""
        if not result.ok:
            return render_prediction_html(result), None, ""
        try:
            overlay = self.service.explain(image)
        except Exception:  # the explanation is a bonus; never lose the prediction over it
            overlay = None
        card = render_card_markdown(self.kb.card(result.prediction.label), self.kb.notice)
        return render_prediction_html(result), overlay, card

    def smear(self, files: list[str] | None, progress=gr.Progress()):
        empty = ("", "", None, None, None, None)
        if not files:
            return (_banner("error", "Upload one or more images or a .zip first."), *empty[1:])
        handles = []
        unreadable: list[Upload] = []  # e.g. a stored upload already cleaned away: one error row
        try:
            for path in files:
                try:
                    handles.append((Path(path).name, open(path, "rb")))
                except OSError as err:
                    unreadable.append(_unreadable_upload(path, err))
            try:
                uploads = collect_uploads(handles, self.service.limits) + unreadable
            except TooManyFilesError as err:
                return (_banner("error", str(err)), *empty[1:])
        finally:
            for _, fh in handles:
                fh.close()
        progress((0, len(uploads)), desc="Classifying", unit="images")
        try:
            results = self.service.classify(
                uploads, progress=lambda d, t: progress((d, t), desc="Classifying", unit="images"),
                timeout_s=self.ui_timeout_s)
        except ServiceTimeout as err:
            return (_banner("error", f"{err}; try fewer images at a time."), *empty[1:])
        diff = compute_differential([r.prediction for r in results if r.ok], self.kb)
        n_err = sum(1 for r in results if not r.ok)
        summary = (f"**{diff.total}** of {len(results)} file(s) classified"
                   + (f", **{n_err}** could not be used (see the table)" if n_err else "")
                   + (f"; {diff.uncertain_count} uncertain, {diff.unfamiliar_count} unfamiliar."
                      if diff.total else ".")
                   + f"\n\n{self.kb.differential_note}\n\n*{self.kb.notice}*")
        diff_table = pd.DataFrame([
            {"Group": r["name"] if r["level"] == "group" else "",
             "Class": "all (group total)" if r["level"] == "group" else r["name"],
             "Count": r["count"], "%": r["percent"]}
            for r in differential_rows(diff)
        ])
        pred_table = pd.DataFrame([
            {"File": r["filename"], "Class": r["class_name"], "Confidence": r["confidence"],
             "Group": r["group"], "Uncertain": r["uncertain"], "Unfamiliar": r["unfamiliar"],
             "Error": r["error"]}
            for r in prediction_rows(results)
        ])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        chart = self.store.write("differential", ".png", plot_differential_png(diff)) if diff.total else None
        csvs = [self.store.write(f"celluscan-predictions-{stamp}", ".csv", predictions_csv(results)),
                self.store.write(f"celluscan-differential-{stamp}", ".csv", differential_csv(diff))]
        return render_flags_html(diff, self.kb), summary, diff_table, chart, pred_table, csvs

    def card(self, class_id: str | None) -> str:
        if not class_id or class_id not in TAXONOMY.ids:
            return ""
        return render_card_markdown(self.kb.card(class_id), self.kb.notice)


# ------------------------------------------------------------------------------ layout


def build_ui(service: ModelService, knowledge: Knowledge, samples_dir: Path | None = None) -> gr.Blocks:
    """The Blocks app. Theme and CSS are passed when mounting (see ``serving.app``)."""
    h = _Handlers(service, knowledge)
    class_choices = [(c.name, c.id) for c in TAXONOMY.classes]
    limits = service.limits
    with gr.Blocks(title="CelluScan", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# CelluScan\nClassify single blood-cell images into 14 types and count a smear. "
            f"Model: `{html.escape(service.info.name)}`. REST API: [/api/v1/docs](/api/v1/docs).\n\n"
            f"*{knowledge.notice}*"
        )
        with gr.Tabs():
            with gr.Tab("Single cell", id="cell"):
                with gr.Row():
                    with gr.Column(scale=1):
                        image_in = UploadedImage(
                            label="Cell image (upload, paste or drop)", type="filepath",
                            sources=["upload", "clipboard"], image_mode=None, height=320,
                            elem_id="cs-cell-input")
                        classify_btn = gr.Button("Classify", variant="primary", elem_id="cs-classify")
                        examples = sample_images(samples_dir)
                        if examples:
                            gr.Examples(examples=[[str(p)] for _, p in examples], inputs=[image_in],
                                        example_labels=[TAXONOMY.cls(c).name for c, _ in examples],
                                        label="Examples (one per class)", examples_per_page=14)
                    with gr.Column(scale=1):
                        result_html = gr.Markdown(elem_id="cs-result")
                        heatmap = gr.Image(label="Attention heatmap (rollout) over the cell",
                                           type="pil", format="png", interactive=False, height=320,
                                           elem_id="cs-heatmap")
                card_md = gr.Markdown(elem_id="cs-card")
                classify_btn.click(h.cell, inputs=[image_in], outputs=[result_html, heatmap, card_md],
                                   api_visibility="private")
            with gr.Tab("Smear (batch)", id="smear"):
                gr.Markdown(
                    f"Upload many single-cell images, or a .zip of them (up to {limits.max_files} "
                    f"images, {limits.max_file_bytes / (1024 * 1024):g} MB each).")
                files_in = gr.File(label="Images or .zip", file_count="multiple", type="filepath",
                                   elem_id="cs-smear-input")
                smear_btn = gr.Button("Count", variant="primary", elem_id="cs-count")
                flags_html = gr.Markdown(elem_id="cs-flags")
                summary_md = gr.Markdown(elem_id="cs-smear-summary")
                chart = gr.Image(label="Differential", type="filepath", interactive=False,
                                 elem_id="cs-chart", height=520)
                diff_df = gr.Dataframe(label="Differential count", interactive=False,
                                       elem_id="cs-differential")
                preds_df = gr.Dataframe(label="Predictions", interactive=False, wrap=True,
                                        elem_id="cs-predictions")
                csv_out = gr.File(label="Download CSV", file_count="multiple", interactive=False,
                                  elem_id="cs-csv")
                smear_btn.click(h.smear, inputs=[files_in],
                                outputs=[flags_html, summary_md, diff_df, chart, preds_df, csv_out],
                                api_visibility="private")
            with gr.Tab("Cell guide", id="guide"):
                choice = gr.Dropdown(choices=class_choices, value=TAXONOMY.ids[0], label="Cell type")
                guide_md = gr.Markdown(h.card(TAXONOMY.ids[0]))
                choice.change(h.card, inputs=[choice], outputs=[guide_md], api_visibility="private")
    return demo
