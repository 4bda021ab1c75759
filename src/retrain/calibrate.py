"""Calibrated confidence and "none of these": temperature scaling and a confidence threshold.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T; it changes no
prediction, only how confident they are, so that among photos given 0.9, about 90% are right.
T is fitted on held-out predictions: the validation split's, plus, for a head on cached
features, out-of-fold predictions on the training split (cheap, and many more of them), or
after a backbone comparison its winner's out-of-fold predictions on both splits. On a
small folder a T fitted on a handful of photos does harm (2 validation photos once gave T 4.88
and raised the test error from 0.6% to 24.9%), so T is kept only with enough evidence and only
when, fitted on one half of the held-out predictions, it lowers the calibration error of the
other half, over repeated random halves. The rejection rule flags a photo as unknown when its
calibrated top probability is below a threshold chosen on the held-out predictions ("auto":
with as much evidence as a temperature needs, else none).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .evidence import INTERVAL_BELOW, interval_text
from .head import nll, softmax
from .metrics import CalibrationReport

ECE_BINS = 15
DEFAULT_FALSE_REJECTION = 0.05  # "auto" threshold: reject about 5% of in-class validation photos
MIN_EVIDENCE = 100  # held-out predictions needed before a temperature is fitted at all (54 proved too few)
CROSS_FITS = 10  # random halvings tried when deciding whether the temperature helps
CROSS_FIT_ROWS = 10_000  # held-out rows the decision looks at, at most
MIN_GAIN = 0.9  # kept only if the cross-fitted calibration error falls below 0.9x the uncalibrated one


def enough_evidence(n: int) -> bool:
    """Whether n predictions can carry a calibration figure: a temperature, an auto threshold, an ECE."""
    return n >= MIN_EVIDENCE


def fit_temperature(z: np.ndarray, y: np.ndarray, may_sharpen: bool = True) -> float:
    """The T in [0.05, 20] minimising NLL on (z, y) (golden-section search on log T); T >= 1 unless may_sharpen.

    Without a single error the NLL keeps falling as T shrinks, which is no evidence for
    sharpening: then T may only soften (T >= 1).
    """
    if len(y) < 2:
        return 1.0
    lo, hi = np.log(0.05), np.log(20.0)
    if not may_sharpen or (z.argmax(axis=1) == y).all():
        lo = 0.0
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(z, y, np.exp(a)), nll(z, y, np.exp(b))
    for _ in range(40):  # the NLL is unimodal in log T; 0.618^40 of the range is far below any T that matters
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


def helps(z: np.ndarray, y: np.ndarray, may_sharpen: bool, seed: int = 0) -> tuple[bool, float, float]:
    """(keep?, error before, error after): does a T fitted on one half lower the other half's ECE and NLL?

    Averaged over CROSS_FITS random halves, each half used once to fit and once to measure.
    """
    rng = np.random.default_rng(seed)
    before, after, nll_gain = [], [], []
    for _ in range(CROSS_FITS):
        order = rng.permutation(len(y))
        for fit, held in (order[: len(y) // 2], order[len(y) // 2:]), (order[len(y) // 2:], order[: len(y) // 2]):
            t = fit_temperature(z[fit], y[fit], may_sharpen)
            before.append(reliability(softmax(z[held]), y[held])["ece"])
            after.append(reliability(softmax(z[held], t), y[held])["ece"])
            nll_gain.append(nll(z[held], y[held], 1.0) - nll(z[held], y[held], t))
    b, a = float(np.mean(before)), float(np.mean(after))
    return a < MIN_GAIN * b and float(np.mean(nll_gain)) > 0, b, a


def choose_temperature(z: np.ndarray, y: np.ndarray, may_sharpen: bool, seed: int = 0) -> tuple[float, str]:
    """(T, why): a temperature fitted on held-out logits, or 1.0 with the reason it was not kept.

    may_sharpen: whether T < 1 is allowed. Only for networks trained with label smoothing, which
    leaves them underconfident by design (a fine-tuned Lite0 on rock_paper_scissors: T 0.42,
    test ECE 17.0% -> 2.2%). A head trained on plain cross-entropy that looks underconfident on
    held-out photos from its own folder was sharpened to T 0.78 and grew overconfident on
    rock_paper_scissors' test photos, taken elsewhere (ECE 9.8% -> 12.5%): photos met in use are
    seldom easier than held-out ones, so such a head may only be softened.
    """
    if not enough_evidence(len(y)):
        return 1.0, (f"not calibrated: {len(y)} held-out predictions are too few to fit a temperature "
                     f"(need {MIN_EVIDENCE}); confidence is left as trained")
    sample = np.random.default_rng(seed).permutation(len(y))[:CROSS_FIT_ROWS]  # plenty to decide, bounded cost
    keep, before, after = helps(z[sample], y[sample], may_sharpen, seed)
    if not keep:
        return 1.0, (f"not calibrated: on held-out halves temperature scaling did not lower the calibration "
                     f"error enough ({100 * before:.1f}% -> {100 * after:.1f}%); confidence is left as trained")
    t = fit_temperature(z, y, may_sharpen)
    return t, (f"temperature {t:.2f} fitted on {len(y)} held-out predictions (it lowered the calibration error "
               f"of held-out halves {100 * before:.1f}% -> {100 * after:.1f}%)")


@dataclass
class Calibration:
    temperature: float
    unknown_threshold: float  # 0: never reject
    suggested_threshold: float  # what "auto" would pick (0, none, on fewer than MIN_EVIDENCE held-out predictions)
    report: CalibrationReport


def _threshold(asked: float | str | None, suggested: float, held_out: int) -> tuple[float, str | None]:
    """(unknown threshold, how it was set): `auto` needs as much held-out evidence as a temperature,
    for a 5% quantile of a few overconfident predictions rejects far more than 5% of new photos."""
    if asked == "auto" and not enough_evidence(held_out):
        return 0.0, (f"no unknown threshold set: {held_out} held-out predictions are too few to choose one "
                     f"(auto needs {MIN_EVIDENCE}); give --unknown_threshold a probability to set one")
    if asked == "auto":
        return suggested, (f"auto: rejects about {100 * DEFAULT_FALSE_REJECTION:.0f}% of {held_out} held-out "
                           "in-class predictions")
    return float(asked or 0.0), ("set by --unknown_threshold" if asked else None)


def calibration_error_text(report: CalibrationReport, n: int, photos: str = "photos") -> str:
    """The expected calibration error on the n photos it was measured on, or why it is not measurable there:
    a clause ("expected calibration error on 400 photos: ...") that callers put into their sentence.

    An ECE needs as much evidence as a temperature: on fewer photos its 15 bins hold a few each, and
    the figure is noise (6 photos once read as a precise 5.5%)."""
    if not enough_evidence(n) or report.test_ece_after is None:
        return f"expected calibration error: not measurable on {n} {photos}"
    after = f"{100 * report.test_ece_after:.1f}%"
    if not report.calibrated:  # no temperature: before and after are one figure
        return f"expected calibration error on {n} {photos}: {after} (confidence as trained)"
    before = f"{100 * report.test_ece_before:.1f}% before, " if report.test_ece_before is not None else ""
    return f"expected calibration error on {n} {photos}: {before}{after} after temperature scaling"


def unknown_threshold_text(report: CalibrationReport, n_test: int, photos: str = "in-class test photos") -> str | None:
    """The unknown threshold as a user reads it: its value, how it was set and the `photos` it flags, counted
    (with the interval under INTERVAL_BELOW photos); or why `auto` set none; None: not asked."""
    t, why = report.unknown_threshold, report.unknown_threshold_why
    if not t:
        return why
    text = f"Unknown threshold {t:.3f}" + (f" ({why})" if why else "")
    if report.test_false_rejection is not None and n_test:
        flagged = round(report.test_false_rejection * n_test)
        interval = f"; {interval_text(flagged / n_test, n_test)}" if n_test < INTERVAL_BELOW else ""
        text += f": it flags {flagged}/{n_test} {photos} as unknown ({100 * flagged / n_test:.1f}%{interval})"
    return text


def calibrate(z_held: np.ndarray, y_held: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
              threshold: float | str | None, may_sharpen: bool = True, seed: int = 0) -> Calibration:
    """Choose T on held-out logits, measure ECE before/after on test, and settle the unknown threshold.

    Figures without the evidence they need are left out (None), not stored as precise numbers: the
    suggested threshold and its test rejection rate below MIN_EVIDENCE held-out predictions, the test
    ECE and NLL below MIN_EVIDENCE test photos. The rejection rate at the chosen threshold is kept:
    it is a count over the test photos, and is shown as one (unknown_threshold_text).
    """
    t, why = choose_temperature(z_held, y_held, may_sharpen, seed)
    suggested = auto_threshold(softmax(z_held, t)) if enough_evidence(len(y_held)) else 0.0
    chosen, threshold_why = _threshold(threshold, suggested, len(y_held))
    report = CalibrationReport(temperature=t, calibrated=t != 1.0, why=why, held_out_predictions=len(y_held),
                               suggested_unknown_threshold=suggested, unknown_threshold=chosen,
                               unknown_threshold_why=threshold_why)
    scaled = softmax(z_test, t) if len(z_test) else None
    if scaled is not None:
        top = scaled.max(axis=1)
        report = replace(report, test_false_rejection=float((top < chosen).mean()),
                         test_false_rejection_at_suggested=float((top < suggested).mean()) if suggested else None)
    if enough_evidence(len(z_test)):
        before, after = reliability(softmax(z_test), y_test), reliability(scaled, y_test)
        report = replace(report, test_ece_before=before["ece"], test_ece_after=after["ece"],
                         test_nll_before=nll(z_test, y_test, 1.0), test_nll_after=nll(z_test, y_test, t),
                         reliability_after=after["bins"], reliability_before=before["bins"])
    return Calibration(t, chosen, suggested, report)
