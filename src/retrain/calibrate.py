"""Calibrated confidence and "none of these": temperature scaling and a confidence threshold.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on the
validation split; it changes no prediction, only how confident they are, so that among photos
given 0.9, about 90% are right. The rejection rule flags a photo as unknown when its calibrated
top probability is below a threshold chosen on validation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head import softmax

ECE_BINS = 15
DEFAULT_FALSE_REJECTION = 0.05  # "auto" threshold: reject about 5% of in-class validation photos


def nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of labels y under softmax(z / T)."""
    zt = z / temperature
    zt = zt - zt.max(axis=1, keepdims=True)
    log_p = zt - np.log(np.exp(zt).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] minimising validation NLL (golden-section search on log T).

    Without a single validation error the NLL keeps falling as T shrinks, which is no evidence
    for sharpening: then T may only soften (T >= 1).
    """
    if len(y) < 2:
        return 1.0
    lo, hi = np.log(0.05), np.log(20.0)
    if (z.argmax(axis=1) == y).all():
        lo = 0.0
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(z, y, np.exp(a)), nll(z, y, np.exp(b))
    for _ in range(60):  # the NLL is unimodal in log T
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(z, y, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(z, y, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error and the per-bin accuracy/confidence of a reliability diagram."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            acc, mean_conf = correct[mask].mean(), conf[mask].mean()
            ece += mask.mean() * abs(acc - mean_conf)
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                         "accuracy": float(acc), "confidence": float(mean_conf)})
    return {"ece": float(ece), "bins": rows}


def auto_threshold(probs: np.ndarray, false_rejection: float = DEFAULT_FALSE_REJECTION) -> float:
    """The top-probability threshold that rejects about `false_rejection` of these in-class photos."""
    if not len(probs):
        return 0.0
    return float(np.quantile(probs.max(axis=1), false_rejection))


@dataclass
class Calibration:
    temperature: float
    unknown_threshold: float  # 0: never reject
    suggested_threshold: float  # what "auto" would pick
    report: dict


def calibrate(z_val: np.ndarray, y_val: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
              threshold: float | str | None) -> Calibration:
    """Fit T on validation, measure ECE before/after on test, and settle the unknown threshold."""
    t = fit_temperature(z_val, y_val)
    suggested = auto_threshold(softmax(z_val, t)) if len(z_val) else 0.0
    chosen = suggested if threshold == "auto" else float(threshold or 0.0)
    report: dict = {"temperature": t, "suggested_unknown_threshold": suggested, "unknown_threshold": chosen}
    if len(z_test):
        before, after = reliability(softmax(z_test), y_test), reliability(softmax(z_test, t), y_test)
        report |= {"test_ece_before": before["ece"], "test_ece_after": after["ece"],
                   "test_nll_before": nll(z_test, y_test, 1.0), "test_nll_after": nll(z_test, y_test, t),
                   "reliability_after": after["bins"], "reliability_before": before["bins"]}
        top = softmax(z_test, t).max(axis=1)
        report["test_false_rejection"] = float((top < chosen).mean())
        report["test_false_rejection_at_suggested"] = float((top < suggested).mean())
    return Calibration(t, chosen, suggested, report)
