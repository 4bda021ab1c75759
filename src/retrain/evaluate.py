"""Evaluation metrics: accuracy, per-class precision/recall/F1 and the confusion matrix."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Metrics as JSON-ready values; confusion_matrix[i][j] counts true class i predicted as j."""
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
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(actual)}
    present = [m for m in per_class.values() if m["support"]]
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else None,
        "num_images": int(len(y_true)),
        "macro_f1": float(np.mean([m["f1"] for m in present])) if present else None,
        "per_class": per_class,
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }


def format_metrics(metrics: dict) -> str:
    """A plain-text table of per-class metrics and the confusion matrix."""
    classes = metrics["classes"]
    width = max(8, *(len(c) for c in classes))
    lines = [f"Accuracy = {100 * metrics['accuracy']:.1f}% (N={metrics['num_images']})", "",
             f"{'class':<{width}}  precision  recall     f1  support"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):",
              " " * width + "  " + "  ".join(f"{c[:8]:>8}" for c in classes)]
    for name, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)


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
