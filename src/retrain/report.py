"""report.html: what the model learned, readable offline (plots and thumbnails embedded).

Sections: dataset summary, learning curves, confusion matrix, per-class metrics, worst mistakes,
reliability diagram with calibration error, and occlusion saliency maps. Everything is computed
from the model directory (model.onnx, metrics.json) and, optionally, a folder of labelled photos
to evaluate on; the plots are also saved as PNG files beside the report, and kept in the cache
under a digest of what they show, so that saving the same model again redraws none of them.
"""
from __future__ import annotations

import base64
import html
import io
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.font_manager import FontProperties, findfont  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from .calibrate import calibration_error_text, enough_evidence, reliability, unknown_threshold_text  # noqa: E402
from .evaluation import class_cells, evaluation_of_folder, table_notes, verdict, worst_mistakes  # noqa: E402
from .evidence import describe_accuracy  # noqa: E402
from .decode import UnreadableImage, load_image, open_rgb  # noqa: E402
from .errors import UserError  # noqa: E402
from .files import atomic_write_bytes, atomic_write_text, default_cache_dir  # noqa: E402
from .memo import DiskMemo, digest  # noqa: E402
from .outputs import os_error_message  # noqa: E402
from .metrics import CalibrationReport, ClassificationMetrics, PredictionRecord, RunMetrics, read_metrics  # noqa: E402
from .prediction import METRICS_FILE, MODEL_FILE, REPORT_FILE, Classifier  # noqa: E402

MISTAKES_SHOWN = 12
SALIENCY_SHOWN = 4
CURVES_PNG, CONFUSION_PNG, RELIABILITY_PNG = "learning_curves.png", "confusion_matrix.png", "reliability.png"
FIGURES_KEPT = 500  # plots kept for reruns (~75 KB each, 7 a run): the least recently used beyond go
# A plot is found again only if drawn by this same code with the same libraries.
_DRAWN_BY = digest(Path(__file__).read_bytes(), matplotlib.__version__, ort.__version__)


def saliency_name(i: int) -> str:
    return f"saliency_{i}.png"


# Every plot file a report writes beside itself: a new report removes those it does not write again.
PLOT_FILES = frozenset([CURVES_PNG, CONFUSION_PNG, RELIABILITY_PNG] + [saliency_name(i) for i in range(SALIENCY_SHOWN)])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _sound_png(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data), formats=["PNG"]).verify()  # checks every chunk's CRC
        return True
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError):
        return False


def figure_memo(cache_dir: Path | None) -> DiskMemo:
    """The report's plots kept in the cache, found again by what they show."""
    return DiskMemo((cache_dir or default_cache_dir()) / "figures", ".png", _sound_png, FIGURES_KEPT)


def _drawn(figures: DiskMemo, what: str, draw: Callable[[], bytes], *shown: object) -> bytes:
    """A plot drawn by `draw`, or the same one kept from before: `shown` is everything it depends on."""
    return figures.get(digest(_DRAWN_BY, what, *shown), draw)


def _model_digest(path: Path) -> str:
    """What a model computes, not when it was made: its graph and metadata, its provenance (dated) aside."""
    model = onnx.load(str(path), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props if p.key != "retrain:provenance"}
    return digest(model.graph.SerializeToString(), metadata)


def _img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def curve_panels(metrics: RunMetrics) -> list[tuple[list[dict], str]]:
    """(history, its x key) of each training phase that has one: the head's steps, fine-tuning's epochs."""
    head = metrics.head.history if metrics.head else []
    tuned = metrics.finetune.history if metrics.finetune else []
    return [(h, x) for h, x in ((head, "step"), (tuned, "epoch")) if h]


def learning_curves(panels: list[tuple[list[dict], str]]) -> bytes:
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for row, (hist, key) in enumerate(panels):
        xs = [e[key] for e in hist]
        title = "head on cached features" if key == "step" else "fine-tuning"
        for col, (metric, label) in enumerate((("accuracy", "accuracy"), ("loss", "cross-entropy loss"))):
            ax = axes[row][col]
            for split in ("train", "validation"):
                ys = [e.get(f"{split}_{metric}", np.nan) for e in hist]  # epoch 0 has validation only
                if not np.all(np.isnan(ys)):
                    ax.plot(xs, ys, marker="o" if key == "epoch" else None, label=split)
            ax.set_xlabel(key)
            ax.set_ylabel(label)
            ax.set_title(f"{label} ({title})")
            ax.grid(alpha=0.3)
            ax.legend()
    return _png(fig)


def font_lacks_letters(names: list[str]) -> bool:
    """Whether the plots' font has no glyph for some letter of `names` (Korean class names where no CJK
    font is installed would be drawn as empty boxes)."""
    font = FT2Font(findfont(FontProperties(family=plt.rcParams["font.family"])))
    return any(font.get_char_index(ord(c)) == 0 for name in names for c in name if not c.isspace())


def axis_names(classes: list[str]) -> list[str]:
    """The class names a plot can show: the names, or their numbers where the font cannot draw them."""
    return [str(i) for i in range(len(classes))] if font_lacks_letters(classes) else classes


def literal_text() -> AbstractContextManager:
    """Text drawn as written, for plots that show a user's names.

    A class name such as "cost $_$" is no formula: matplotlib's maths parser failed on it (and drew
    "$x^2$" as x squared). Set only around our drawing: an API user's rcParams stay theirs.
    """
    return matplotlib.rc_context({"text.parse_math": False})


def confusion_plot(cm: np.ndarray, classes: list[str]) -> bytes:
    """The matrix with `classes` (see axis_names) on its axes."""
    n = len(classes)
    with literal_text():  # tick labels are made as the figure is drawn: savefig too stays inside
        fig, ax = plt.subplots(figsize=(2 + 0.6 * n, 1.6 + 0.6 * n))
        rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
        ax.set_title("Confusion matrix (counts; colour: share of the true class)")
        return _png(fig)


Curve = tuple[str, list[dict], float]  # a reliability curve: its name, its bins, its ECE


def reliability_curves(cal: CalibrationReport) -> list[Curve]:
    """The reliability diagram's curves: before and after the temperature, or one as trained where there is none."""
    if not cal.calibrated:  # temperature 1: "after" is the same curve as before
        return [("confidence as trained", cal.reliability_after or [], _or_nan(cal.test_ece_after))]
    before = [("before temperature scaling", cal.reliability_before, _or_nan(cal.test_ece_before))]
    after = (f"after temperature scaling (T {cal.temperature:.2f})", cal.reliability_after or [],
             _or_nan(cal.test_ece_after))
    return (before if cal.reliability_before else []) + [after]


def reliability_plot(curves: list[Curve], n: int) -> bytes:
    """The diagram of `curves` measured on n photos (drawn only where enough_evidence(n))."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, bins, ece in curves:
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{name} (ECE {100 * ece:.1f}%)")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, title=f"N = {n} photos", title_fontsize=8)
    ax.set_title("Reliability diagram")
    return _png(fig)


def occlusion_saliency(clf: Classifier, image: np.ndarray, target: int, grid: int = 7) -> np.ndarray:
    """How much the target class probability drops when each region is greyed out: (grid, grid)."""
    s = image.shape[0]
    patch, stride = s // 4, (s - s // 4) // (grid - 1)
    batch = np.repeat(image[None], grid * grid, axis=0)
    for k in range(grid * grid):
        y, x = (k // grid) * stride, (k % grid) * stride
        batch[k, y:y + patch, x:x + patch] = 127
    base = clf.probabilities(image[None])[0, target]
    drops = np.concatenate([clf.probabilities(batch[i:i + 32])[:, target] for i in range(0, len(batch), 32)])
    return np.maximum(base - drops, 0).reshape(grid, grid)


def saliency_png(image: np.ndarray, heat: np.ndarray) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.4))
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(np.kron(heat, np.ones((8, 8))), cmap="jet", alpha=0.45,
                   extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
    for ax in axes:
        ax.axis("off")
    return _png(fig)


def _thumbnail(path: str, side: int = 128) -> str:
    try:  # decoded as for prediction: upright, within the pixel limit, a big JPEG at a reduced scale
        img = open_rgb(path, side)
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        return f'<img alt="{html.escape(Path(path).name)}" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    except (UnreadableImage, OSError):  # a vanished or broken file: show its name only
        return "<span>(image unavailable)</span>"


def _evaluation(clf: Classifier, metrics: RunMetrics | None, image_dir: str | Path | None
                ) -> tuple[ClassificationMetrics | None, list[PredictionRecord], CalibrationReport | None, list[str],
                           int]:
    """(confusion/per-class metrics, predictions with confidence, calibration report, warnings, copies of
    training photos among them) to show; the verdict warns of the copies itself."""
    if image_dir is None:  # then metrics is there: write_report refuses a model without both
        return (metrics.test, metrics.test_predictions or [], metrics.calibration, [],
                metrics.test_evidence.copies_of_training)
    evaluation = evaluation_of_folder(clf, image_dir, quiet=True)
    preds = evaluation.predictions
    cal = _folder_calibration(clf, metrics.calibration if metrics else None, evaluation.probabilities,
                              np.array([p.label for p in preds]))
    skipped = [evaluation.skipped_line()] if evaluation.skipped else []
    for line in skipped:  # which photos the figures leave out, on the page and now
        print(line, file=sys.stderr)
    own = evaluation.own_folder_warning  # the copies' warning is the verdict's
    return evaluation.metrics, preds, cal, ([own] if own else []) + skipped, evaluation.copies_of_training


def _folder_calibration(clf: Classifier, model: CalibrationReport | None, probs: np.ndarray,
                        labels: np.ndarray) -> CalibrationReport:
    """The model's temperature and unknown threshold (how they were set: `model`, from its metrics.json), measured on
    a folder's photos (probabilities as the model gives them, temperature applied): the ECE where there are
    enough of them, and how many the threshold flags."""
    temperature = float(clf.metadata.get("retrain:temperature", 1.0))
    after = reliability(probs, labels) if enough_evidence(len(labels)) else None
    threshold = clf.unknown_threshold
    return CalibrationReport(
        temperature=temperature, calibrated=temperature != 1.0, why=model.why if model else "",
        held_out_predictions=model.held_out_predictions if model else 0, suggested_unknown_threshold=0.0,
        unknown_threshold=threshold, unknown_threshold_why=model.unknown_threshold_why if model else None,
        test_ece_after=after["ece"] if after else None, reliability_after=after["bins"] if after else None,
        test_false_rejection=float((probs.max(axis=1) < threshold).mean()) if threshold else None)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(model_dir: str | Path, image_dir: str | Path | None = None, title: str | None = None,
                 metrics: RunMetrics | None = None, cache_dir: Path | None = None) -> Path:
    """Write report.html and its PNG plots into the model directory; returns the report's path.

    title: the model's name on the page (default: the folder's; a model being saved is written in a
    staging folder first, whose name means nothing to the reader). metrics: the model's, when the
    caller has them (saving a model): metrics.json is then not read back. cache_dir: where plots
    drawn before are found again (default: the usual cache).
    """
    model_dir = Path(model_dir)
    if not (model_dir / MODEL_FILE).is_file():
        raise UserError(f"{model_dir} is not a model directory (no {MODEL_FILE})")
    if metrics is None and (model_dir / METRICS_FILE).exists():
        metrics = read_metrics(model_dir / METRICS_FILE)
    if metrics is None and image_dir is None:  # a page of empty sections would replace a good report
        raise UserError(f"{model_dir} has no {METRICS_FILE} (a model copied without it, or an export): give a folder "
                        f"of labelled photos to evaluate it on: retrain report {model_dir} IMAGE_DIR")
    clf = Classifier(model_dir / MODEL_FILE)
    classes = clf.labels
    evaluation, preds, cal, warnings, copies = _evaluation(clf, metrics, image_dir)
    sections, pngs, figures = [], {}, figure_memo(cache_dir)

    lines = (warnings + verdict(evaluation, None, 0, classes, [], photos=f"photos in {image_dir}",
                                copies_of_training=copies) if image_dir else metrics.verdict)
    if lines:
        sections.append(("Verdict", "".join(f"<p>{html.escape(line)}</p>" for line in lines)))
    sections.append(("Dataset", _dataset_section(metrics, classes, clf.metadata.get("retrain:backbone", "?"))))

    panels = curve_panels(metrics) if metrics else []
    curves = _drawn(figures, "curves", lambda: learning_curves(panels), panels) if panels else None
    if curves:
        pngs[CURVES_PNG] = curves
        sections.append(("Learning curves", _img_tag(curves, "learning curves")))

    if evaluation and evaluation.confusion_matrix:
        cm = np.array(evaluation.confusion_matrix)
        names = axis_names(classes)  # decided once: the plot (cached by what it shows) and its key agree
        pngs[CONFUSION_PNG] = _drawn(figures, "confusion", lambda: confusion_plot(cm, names), cm, names)
        rows = [[html.escape(name), *class_cells(evaluation, name), str(m.support)]
                if m.support else [html.escape(name), "no test photos", "", "", "0"]
                for name, m in evaluation.per_class.items()]
        accuracy = describe_accuracy(evaluation.accuracy, evaluation.num_images, copies=copies)
        sections.append(("Confusion matrix", f"<p>Accuracy <b>{html.escape(accuracy)}"
                         f"</b> on {'images of ' + html.escape(str(image_dir)) if image_dir else 'test images'}.</p>"
                         + _img_tag(pngs[CONFUSION_PNG], "confusion matrix") + _class_key(classes, names)))
        sections.append(("Per-class metrics", _table(rows, ["class", "precision", "recall", "F1", "support"])
                         + "".join(f"<p>{html.escape(note)}</p>" for note in table_notes(evaluation))))

    mistakes = worst_mistakes(preds)
    cells = [f"<figure>{_thumbnail(p.path)}<figcaption>true <b>{html.escape(classes[p.label])}</b><br>"
             f"predicted <b>{html.escape(classes[p.predicted])}</b> ({p.confidence:.2f})</figcaption></figure>"
             for p in mistakes[:MISTAKES_SHOWN]]
    sections.append(("Worst mistakes", f'<div class="grid">{"".join(cells)}</div>' if cells
                     else "<p>No mistakes on these images.</p>" if preds else "<p>No test photos: no mistakes to "
                     "show.</p>"))

    n_shown = len(preds)
    photos = f"photos in {image_dir}" if image_dir else "in-class test photos"
    threshold = unknown_threshold_text(cal, n_shown, photos) if cal else None
    if cal and n_shown:
        text = f"<p>{html.escape(cal.why)}.</p>" if cal.why else ""
        text += f"<p>Temperature {cal.temperature:.3f}; {html.escape(calibration_error_text(cal, n_shown))}.</p>"
        if enough_evidence(n_shown) and cal.reliability_after:  # the bar the ECE is stated at
            shown = (reliability_curves(cal), n_shown)
            pngs[RELIABILITY_PNG] = _drawn(figures, "reliability", lambda: reliability_plot(*shown), *shown)
        sections.append(("Calibration", text + (f"<p>{html.escape(threshold)}.</p>" if threshold else "")
                         + (_img_tag(pngs[RELIABILITY_PNG], "reliability diagram") if RELIABILITY_PNG in pngs else "")))
    elif threshold:
        sections.append(("Calibration", f"<p>{html.escape(threshold)}.</p>"))

    chosen = (mistakes[:SALIENCY_SHOWN // 2] + [p for p in preds if p.label == p.predicted][:SALIENCY_SHOWN // 2])
    figs, model_digest = [], _model_digest(model_dir / MODEL_FILE) if chosen else ""
    for i, p in enumerate(chosen):
        try:
            image = load_image(p.path, clf.prep)
        except UnreadableImage:
            continue
        png = _drawn(figures, "saliency", lambda: saliency_png(image, occlusion_saliency(clf, image, p.predicted)),
                     model_digest, image, p.predicted)
        pngs[saliency_name(i)] = png
        # The caption is the page's text, not the plot's: the browser draws any script a file or class name has.
        figs.append(f"<figure class=\"saliency\">{_img_tag(png, f'saliency map {i}')}<figcaption>"
                    f"{html.escape(Path(p.path).name)}: evidence for <b>{html.escape(classes[p.predicted])}</b>"
                    "</figcaption></figure>")
    sections.append(("What the model looked at", "<p>Occlusion saliency: red regions are those whose greying-out "
                     "lowers the predicted class's probability most.</p>" + "".join(figs)))

    for name, png in pngs.items():
        atomic_write_bytes(model_dir / name, png)
    _remove_stale_plots(model_dir, set(pngs))
    if figures.unwritable:
        why = os_error_message(figures.unwritable, "write", figures.folder)
        print(f"Note: the report's plots could not be kept for reruns ({why}).", file=sys.stderr)
    elif figures.made:
        figures.prune()
    path = model_dir / REPORT_FILE
    atomic_write_text(path, _page(sections, title or model_dir.name))
    return path


def _remove_stale_plots(model_dir: Path, written: set[str]) -> None:
    """Remove the plot files an earlier report left that this one does not write (reliability.png from a bigger
    folder, saliency_3.png from one with more mistakes): beside this report they would show another evaluation."""
    for name in PLOT_FILES - written:
        path = model_dir / name
        if not path.is_dir():
            path.unlink(missing_ok=True)


def _class_key(classes: list[str], shown: list[str]) -> str:
    """Which class each number on the plot stands for, where the plot shows numbers (see axis_names)."""
    if shown == classes:
        return ""
    pairs = ", ".join(f"{i} = {html.escape(name)}" for i, name in enumerate(classes))
    return f"<p>The plot numbers the classes (its font cannot draw all of their names): {pairs}.</p>"


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _dataset_section(metrics: RunMetrics | None, classes: list[str], backbone: str) -> str:
    """Backbone, mode, images per split and per class, skipped files (what metrics.json has of them)."""
    per_class = metrics.class_counts if metrics else {}
    rows = [[html.escape(c)] + [str(per_class.get(split, {}).get(c, "")) for split in ("train", "validation", "test")]
            for c in classes]
    return (f"<p>Backbone <b>{html.escape(metrics.backbone if metrics else backbone)}</b>, "
            f"mode <b>{html.escape(metrics.mode if metrics else '?')}</b>; images per split: "
            + ", ".join(f"{k} {v}" for k, v in (metrics.num_images if metrics else {}).items()) + "</p>"
            + _table(rows, ["class", "train", "validation", "test"])
            + f"<p>Files (or folders) skipped in training: {len(metrics.skipped_files) if metrics else 0}</p>"
            + (f"<p>How it was trained: {html.escape(str(metrics.plan.get('reason', '')))}</p>" if metrics else "")
            + _backbone_comparison(metrics))


def _backbone_comparison(metrics: RunMetrics | None) -> str:
    """The cross-validated counts that chose the backbone, when the default run compared some."""
    scores = metrics.backbone_comparison if metrics else None
    if not scores:
        return ""
    rows = [[html.escape(s.name), f"{s.correct}/{s.photos}", f"{100 * s.correct / s.photos:.1f}%",
             "exported" if s.name == metrics.backbone else ""] for s in scores]
    return ("<p>Backbones compared by out-of-fold accuracy of their heads on the training and validation photos "
            "(the most right is exported; a tie keeps the smaller):</p>"
            + _table(rows, ["backbone", "right", "accuracy", ""]))


def _page(sections: list[tuple[str, str]], title: str) -> str:
    body = "".join(f'<section id="{html.escape(t.lower().replace(" ", "-"))}"><h2>{html.escape(t)}</h2>{c}</section>'
                   for t, c in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retrain report: {html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }} figure {{ margin: 0; width: 140px; font-size: 12px; }} figure.saliency {{ width: auto; margin: 0 0 1em; }}
section {{ margin-bottom: 2em; }} img {{ max-width: 100%; }}
</style></head><body><h1>retrain report: {html.escape(title)}</h1>{body}</body></html>
"""
