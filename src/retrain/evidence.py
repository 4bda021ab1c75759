"""How much a shown accuracy can be trusted: N, the 95% interval, and when there are too few photos to claim one."""
from __future__ import annotations

import math

import numpy as np

TOO_FEW_TO_MEASURE = 10  # held-out photos: below this no accuracy is claimed, only its interval
INTERVAL_BELOW = 1000  # photos: below this every accuracy shown comes with its 95% interval (+-3 points at 1000)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound at 0/n and n/n, where the normal one collapses."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def measurable(n: int, copies: int = 0) -> bool:
    """Whether n photos, `copies` of them copies of photos the model trained on, can carry an accuracy figure."""
    return n - copies >= TOO_FEW_TO_MEASURE


def describe_accuracy(accuracy: float | None, n: int, photos: str = "photos", copies: int = 0) -> str:
    """An accuracy as a user should read it: "94.1% (N=367, 95% CI 91.2-96.1%)", or why there is none.

    copies: how many of the n photos are copies of photos the model trained on; they do not count
    towards the photos a figure needs."""
    if accuracy is None or n == 0:
        return f"not measured: no {photos}"
    interval = interval_text(accuracy, n)
    if not measurable(n, copies):
        unseen = f", {n - copies} of them not trained on" if copies else ""
        return f"not measurable on {n} {photos}{unseen} ({round(accuracy * n)}/{n} right; {interval})"
    if n < INTERVAL_BELOW:
        return f"{100 * accuracy:.1f}% (N={n}, {interval})"
    return f"{100 * accuracy:.1f}% (N={n})"


def interval_text(accuracy: float, n: int) -> str:
    """The interval in whole percents, rounded outwards: rounding to nearest made 800/800 read "CI 100-100%"
    (its lower end is 99.5%)."""
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"95% CI {math.floor(100 * lo + 1e-9)}-{math.ceil(100 * hi - 1e-9)}%"
