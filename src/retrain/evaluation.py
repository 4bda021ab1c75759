"""Evaluation metrics: accuracy with its uncertainty, per-class precision/recall/F1, the confusion matrix."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .evidence import TOO_FEW_TO_MEASURE, describe_accuracy, interval_text, measurable, wilson_interval
from .metrics import ClassificationMetrics, ClassMetrics, Evidence, PredictionRecord, SkippedFile, to_json
from .prediction import Classifier, load
from .progress import progress
from .files import default_cache_dir
from .scan import find_split_dirs, scan_labelled_folder, skipped_line, split_record_of
from .split import TRAIN, VALIDATION, SplitRecord
from .validate import TRAIN_RULES, check_argument



def accuracy_evidence(accuracy: float | None, n: int, copies_of_training: int = 0) -> Evidence:
    """What a shown accuracy rests on: N, its 95% interval, and whether N is enough to claim a figure
    (photos the model trained on do not count towards that)."""
    if accuracy is None or n == 0:
        return Evidence(accuracy=None, n=0, interval=None, measurable=False)
    correct = round(accuracy * n)
    return Evidence(accuracy=accuracy, n=n, interval=list(wilson_interval(correct, n)),
                    measurable=measurable(n, copies_of_training), copies_of_training=copies_of_training)


def copies_warning(copies: int, n: int) -> str:
    """One line for test photos that are copies of training photos."""
    return (f"{copies} of the {n} test photos are copies of photos the model trained on (the test folder overlaps "
            "the training photos): the test accuracy is inflated; `retrain doctor` lists them.")


def small_splits_disagree(val: float | None, n_val: int, test: float | None, n_test: int) -> str | None:
    """One line when validation and test accuracy differ only because both are measured on few photos."""
    if val is None or test is None or min(n_val, n_test) >= 50 or abs(val - test) < 0.1:
        return None
    return (f"Validation ({round(val * n_val)}/{n_val} right) and test ({round(test * n_test)}/{n_test} right) "
            "disagree because "
            "both are measured on few photos: neither figure is precise; more photos per class would settle it.")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix ([i][j]: true class i predicted as j)."""
    n = len(classes)
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        # Never predicted: precision is 0/0, unknown. No photos of the class: recall and F1 are unknown.
        # Either as 0 would read as a failing class.
        per_class[name] = ClassMetrics(precision=float(precision) if predicted else None,
                                       recall=float(recall) if actual else None,
                                       f1=float(f1) if actual else None, support=int(actual))
    present = [m for m in per_class.values() if m.support]
    return ClassificationMetrics(
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else None,
        num_images=int(len(y_true)),
        accuracy_interval=list(wilson_interval(int((y_true == y_pred).sum()), len(y_true))) if len(y_true) else None,
        macro_f1=float(np.mean([m.f1 for m in present])) if present else None,
        per_class=per_class,
        classes=list(classes),
        confusion_matrix=cm.tolist(),
    )


NEVER_PREDICTED = "-: the model never predicted this class on these photos, so its precision is undefined."
FEW_PHOTOS = (f"a/b: fewer than {TOO_FEW_TO_MEASURE} photos behind a figure, so the count is shown instead: right "
              "out of the class's photos (recall), or out of the photos predicted as it (precision); no F1 (n/a) on "
              "so few.")


def precision_text(m: ClassMetrics, digits: int = 3) -> str:
    """A class's precision, or '-' where it was never predicted."""
    return "-" if m.precision is None else f"{m.precision:.{digits}f}"


def never_predicted(metrics: ClassificationMetrics) -> bool:
    """Whether some class with photos was never predicted (its precision is undefined: NEVER_PREDICTED says so)."""
    return any(m.support and m.precision is None for m in metrics.per_class.values())


def _counts(metrics: ClassificationMetrics, name: str) -> tuple[int, int]:
    """(right, predicted as it) of a class, from the confusion matrix."""
    i = metrics.classes.index(name)
    return metrics.confusion_matrix[i][i], sum(row[i] for row in metrics.confusion_matrix)


def _too_few(metrics: ClassificationMetrics, name: str) -> tuple[bool, bool]:
    """Whether a class's (precision, recall) rest on fewer than TOO_FEW_TO_MEASURE photos: shown as counts."""
    m = metrics.per_class[name]
    return (m.precision is not None and _counts(metrics, name)[1] < TOO_FEW_TO_MEASURE,
            m.support < TOO_FEW_TO_MEASURE)


def class_cells(metrics: ClassificationMetrics, name: str, digits: int = 3) -> tuple[str, str, str]:
    """A class's (precision, recall, F1) as shown: figures, or below TOO_FEW_TO_MEASURE photos behind one the
    counts ("2/3") and no F1 (FEW_PHOTOS says so); for a class with photos."""
    m = metrics.per_class[name]
    right, predicted = _counts(metrics, name)
    few_predicted, few_photos = _too_few(metrics, name)
    precision = f"{right}/{predicted}" if few_predicted else precision_text(m, digits)
    if few_photos:
        return precision, f"{right}/{m.support}", "n/a"
    return precision, f"{m.recall:.{digits}f}", f"{m.f1:.{digits}f}"


def table_notes(metrics: ClassificationMetrics) -> list[str]:
    """The notes that explain a per-class table's cells other than figures (NEVER_PREDICTED, FEW_PHOTOS)."""
    few = any(m.support and any(_too_few(metrics, name)) for name, m in metrics.per_class.items())
    return [NEVER_PREDICTED] * never_predicted(metrics) + [FEW_PHOTOS] * few


def format_metrics(metrics: ClassificationMetrics, copies_of_training: int = 0) -> str:
    """A plain-text table of per-class metrics and the confusion matrix (copies_of_training: see describe_accuracy)."""
    width = max(8, *(len(c) for c in metrics.classes))
    lines = [f"Accuracy = {describe_accuracy(metrics.accuracy, metrics.num_images, copies=copies_of_training)}", "",
             f"{'class':<{width}}  precision  recall     f1  support"]
    for name, m in metrics.per_class.items():
        if not m.support:
            lines.append(f"{name:<{width}}  {'no photos of this class':>24}  {0:7d}")
            continue
        precision, recall, f1 = class_cells(metrics, name)
        lines.append(f"{name:<{width}}  {precision:>9}  {recall:>6}  {f1:>5}  {m.support:7d}")
    return "\n".join(lines + table_notes(metrics) + [""] + confusion_text(metrics))


def confusion_text(metrics: ClassificationMetrics) -> list[str]:
    """The confusion matrix as text, its columns numbered as the rows: class names cut to fit a column
    would read alike (sunflowers_short and sunflowers_tall both as "sunflowe")."""
    classes, cm = metrics.classes, metrics.confusion_matrix
    key = len(str(len(classes) - 1))
    name_width = max(len(c) for c in classes)
    cell = max(4, key, *(len(str(v)) for row in cm for v in row))
    label = " " * (key + 2 + name_width)
    lines = ["Confusion matrix (rows: true class, columns: predicted, numbered as the rows):",
             label + "  " + "  ".join(f"{j:>{cell}}" for j in range(len(classes)))]
    for i, (name, row) in enumerate(zip(classes, cm)):
        lines.append(f"{i:>{key}}  {name:<{name_width}}  " + "  ".join(f"{v:>{cell}}" for v in row))
    return lines


class Timeline:
    """Test accuracy against training wall time, for `retrain compare`.

    The clock starts when training starts; time spent measuring the test accuracy is excluded,
    so a curve shows what stopping at that moment would have given.
    """

    def __init__(self) -> None:
        self.start, self.excluded = time.perf_counter(), 0.0
        self.points: list[tuple[float, float]] = []  # (seconds, test accuracy)

    def record(self, test_accuracy: Callable[[], float]) -> None:
        now = time.perf_counter()
        accuracy = test_accuracy()
        self.points.append((now - self.start - self.excluded, float(accuracy)))
        self.excluded += time.perf_counter() - now


def most_confused(confusion: list[list[int]], classes: list[str], top: int = 3) -> list[tuple[str, str, int]]:
    """(true class, predicted class, photos) for the largest off-diagonal cells."""
    cm = np.array(confusion)
    np.fill_diagonal(cm, 0)
    cells = [(int(cm[i, j]), i, j) for i, j in zip(*np.nonzero(cm))]
    return [(classes[i], classes[j], n) for n, i, j in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:top]]


def verdict(test: ClassificationMetrics | None, validation_accuracy: float | None, num_validation: int,
            classes: list[str], unsplit_classes: list[str], photos: str = "", copies_of_training: int = 0) -> list[str]:
    """The report's opening lines for a non-expert: the accuracy and what to compare it with, then what to fix.

    `photos` names the photos `test` is over where they are not the model's own test split, without an
    article ("photos in DIR", for a report on another folder): nothing is then said of whether the model
    trained on them.
    """
    lines = [copies_warning(copies_of_training, test.num_images)] if test and copies_of_training else []
    never_seen = "" if copies_of_training else " the model never trained on"
    if test and test.num_images:
        n, support = test.num_images, [m.support for m in test.per_class.values()]
        largest = classes[int(np.argmax(support))]
        baselines = (f"guessing at random scores {100 / len(classes):.0f}%, always answering '{largest}' "
                     f"{100 * max(support) / n:.0f}%")
        if not measurable(n, copies_of_training):
            unseen = f" ({n - copies_of_training} not trained on)" if copies_of_training else ""
            lines.append(f"Only {n} {photos or 'test photos'}{unseen}: too few to measure "
                         f"accuracy ({round(test.accuracy * n)}/{n} right; {interval_text(test.accuracy, n)}). "
                         "Add photos to every class.")
        else:
            lines.append(f"Right on {describe_accuracy(test.accuracy, n)} of "
                         f"{'the ' + photos if photos else 'test photos' + never_seen}; for comparison, {baselines}.")
        pairs = most_confused(test.confusion_matrix, classes)
        if pairs:
            lines.append("Most confused: " + "; ".join(f"{t} taken for {p} ({k} photo{'s' * (k > 1)})"
                                                        for t, p, k in pairs) + ".")
        missing = [c for c, m in test.per_class.items() if not m.support]
        if missing:
            lines.append(f"No {'test photos' if not photos else 'photos in that folder'} of {', '.join(missing)}: "
                         f"how well the model knows {'them' if len(missing) > 1 else 'it'} is not measured.")
    else:
        lines.append("No test photos: the accuracy on new photos is not measured. Add photos, or a test/ folder.")
    if unsplit_classes:
        lines.append(f"Too few photos to hold any out for {', '.join(unsplit_classes)}: all were used for training.")
    disagree = small_splits_disagree(validation_accuracy, num_validation, test.accuracy if test else None,
                                     test.num_images if test else 0)
    return lines + ([disagree] if disagree else [])


def worst_mistakes(predictions: list[PredictionRecord]) -> list[PredictionRecord]:
    """The wrong predictions, the most confident first (the ones a user should look at first)."""
    return sorted((p for p in predictions if p.label != p.predicted), key=lambda p: -p.confidence)


@dataclass
class FolderEvaluation:
    """An exported model run over a folder of class folders."""
    metrics: ClassificationMetrics
    predictions: list[PredictionRecord]  # per readable image, in scan order
    probabilities: np.ndarray  # (images, classes): row i belongs to predictions[i]
    skipped: list[SkippedFile]
    own_folder_warning: str | None = None  # the folder is the model's own training folder: the accuracy is inflated
    copies_of_training: int = 0  # photos whose bytes the model trained on, by its split record (0: none or unknown)

    @property
    def warning(self) -> str | None:
        """Why the accuracy is inflated, if it is: the model's own folder, or copies of its training photos."""
        copies = self.copies_of_training
        return self.own_folder_warning or (copies_warning(copies, len(self.predictions)) if copies else None)

    def evidence(self) -> Evidence:
        """What the accuracy rests on: N, its interval, whether it is measurable, the copies of training photos."""
        return accuracy_evidence(self.metrics.accuracy, self.metrics.num_images, self.copies_of_training)

    def skipped_line(self) -> str | None:
        """The files this evaluation left out, named with the reason (None: none)."""
        return skipped_line([(f.path, f.reason) for f in self.skipped], shown=20) if self.skipped else None

    def to_json(self, with_predictions: bool = False) -> dict:
        """The metrics, the accuracy's evidence and the skipped files as JSON-ready values (what `retrain evaluate
        --json` prints): `evidence` tells a 100% on 2 photos from a measured one."""
        result = (to_json(self.metrics) | {"evidence": to_json(self.evidence()), "skipped_files": to_json(self.skipped)}
                  | ({"warning": self.warning} if self.warning else {}))
        return result | ({"predictions": [to_json(p) | {"probabilities": row.tolist()}
                                          for p, row in zip(self.predictions, self.probabilities)]}
                         if with_predictions else {})


def evaluation_of_folder(model: str | Path | Classifier, image_dir: str | Path, *, workers: int = 2,
                         quiet: bool = False) -> FolderEvaluation:
    """Run the exported model over a folder of class folders: its metrics, every prediction, the unreadable files."""
    check_argument("workers", workers, TRAIN_RULES["workers"])
    clf = model if isinstance(model, Classifier) else load(model)
    dataset = scan_labelled_folder(image_dir, clf.labels, workers=workers + 2, quiet=quiet)
    paths = dataset.samples.paths
    predictions, probabilities, skipped, decoded = [], [], list(dataset.skipped), []
    bar = progress(total=len(paths), desc="Evaluating", unit="img", leave=False, disable=quiet)
    for i, probs, error in clf.probabilities_of(paths, workers=workers):
        bar.update(1)
        sample = dataset.samples[i]
        if error:
            skipped.append((sample.path, error))
            continue
        predictions.append(PredictionRecord(str(sample.path), int(sample.label), int(probs.argmax()),
                                            float(probs.max())))
        probabilities.append(probs)
        decoded.append(i)
    bar.close()
    if not predictions:
        raise UserError(f"none of the images in {image_dir} could be read: {skipped_line(skipped, shown=3)}")
    metrics = classification_metrics(np.array([p.label for p in predictions]),
                                     np.array([p.predicted for p in predictions]), clf.labels)
    copies = trained_copies(clf, dataset.samples.keys[decoded])  # among the photos the figures are over
    return FolderEvaluation(metrics, predictions, np.array(probabilities, np.float32),
                            [SkippedFile(str(p), why) for p, why in skipped], training_folder_warning(clf, image_dir),
                            copies)


def trained_copies(clf: Classifier, keys: np.ndarray) -> int:
    """How many of these photos (content keys) the model trained or was validated on (validation chose its
    training length and epoch), by the split record its training kept in the cache, as training counts copies
    in its own test split (checks.copies_of_training): a copied folder is caught by content where
    training_folder_warning looks at paths. 0 where no record is found (a model from elsewhere, another cache)."""
    provenance = clf.provenance()
    config = provenance.get("config") if isinstance(provenance.get("config"), dict) else {}
    folder = provenance.get("image_dir")
    if not isinstance(folder, str):
        return 0
    try:
        path = split_record_of(folder, config.get("val_dir"), config.get("test_dir"),
                               float(config.get("validation_percentage", 10.0)),
                               float(config.get("testing_percentage", 10.0)),
                               Path(config.get("cache_dir") or default_cache_dir()) / "splits")
    except (OSError, UserError, TypeError, ValueError):  # the training folder is gone or changed shape
        return 0
    return int(np.isin(SplitRecord.load(path).lookup(keys), (TRAIN, VALIDATION)).sum())


def training_folder_warning(clf: Classifier, image_dir: str | Path) -> str | None:
    """A warning where `image_dir` is the folder the model was trained from (or lies inside it, or holds
    it): most of its photos trained the model, so an accuracy measured on them is inflated."""
    provenance = clf.provenance()
    if not isinstance(provenance.get("image_dir"), str):  # a model made elsewhere, or without provenance
        return None
    trained = Path(provenance["image_dir"]).resolve()
    here = Path(image_dir).resolve()
    if here != trained and trained not in here.parents and here not in trained.parents:
        return None
    if any(here == p or p in here.parents for p in _held_out_folders(trained, provenance)):
        return None  # a val/ or test/ folder: photos the model never trained on
    return (f"{image_dir} is the folder this model was trained from: most of these photos trained it, so this "
            "accuracy is inflated; measure it on photos the model never saw (its own test split's accuracy is "
            "in metrics.json and report.html).")


def _held_out_folders(trained: Path, provenance: dict) -> list[Path]:
    """The recorded --val_dir/--test_dir and the val/ and test/ folders beside train/, where they still read."""
    config = provenance.get("config") if isinstance(provenance.get("config"), dict) else {}
    folders = [Path(config[key]).resolve() for key in ("val_dir", "test_dir") if isinstance(config.get(key), str)]
    try:
        return folders + [p.resolve() for split, p in find_split_dirs(trained).items() if split != "train"]
    except (OSError, UserError):  # the folder changed since (a folder added beside the splits): the recorded ones
        return folders


def evaluate_folder(model: str | Path | Classifier, image_dir: str | Path, *, workers: int = 2, quiet: bool = False,
                    with_predictions: bool = False) -> dict:
    """retrain.evaluate: evaluation_of_folder's metrics and skipped files as JSON-ready values.

    with_predictions adds `predictions`: per image its path, label, predicted index, confidence
    and all class probabilities.
    """
    return evaluation_of_folder(model, image_dir, workers=workers, quiet=quiet).to_json(with_predictions)
