"""Learning-rate finder for the head: an exponential sweep, the loss curve, and a suggestion.

Trains the head on cached features while the learning rate grows from `low` to `high`, one
mini-batch per rate, and suggests the rate where the smoothed loss falls fastest (Smith, 2017).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from .checks import MIN_IMAGES
from .config import HeadConfig
from .errors import UserError
from .files import atomic_write_bytes
from .outputs import check_output_file
from .head import _AdamW, _forward_backward, _init_layers, _measure


@dataclass
class LrSweep:
    rates: np.ndarray
    losses: np.ndarray  # smoothed training loss after each step
    suggestion: float
    photos: int = 0  # the training photos it ran on
    smallest_class: int = 0  # of them, in the smallest class

    def caveat(self) -> str | None:
        """Why the suggestion is a guess, where the sweep ran on too few photos a class."""
        if self.smallest_class >= MIN_IMAGES:
            return None
        return (f"the sweep ran on {self.photos} training photos, {self.smallest_class} in the smallest class (fewer "
                f"than {MIN_IMAGES}): its loss curve is noise as much as signal, so the suggestion is a guess; the "
                f"default {HeadConfig().learning_rate:g} is as good a start with so few")


def lr_sweep(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig, low: float = 1e-5,
             high: float = 1.0, steps: int = 200) -> LrSweep:
    """Sweep learning rates geometrically; stops early once the loss explodes."""
    rng = np.random.default_rng(cfg.seed)
    x, y = x.astype(np.float32, copy=False), y.astype(np.int64)  # a memory-mapped matrix stays mapped
    layers = _init_layers(x.shape[1], n_classes, cfg, rng)
    opt = _AdamW(layers, low, cfg.weight_decay)
    rates = np.geomspace(low, high, steps)
    batch = min(cfg.batch_size, len(x))
    losses, smooth, best = [], 0.0, np.inf
    for i, lr in enumerate(rates):
        idx = rng.choice(len(x), batch, replace=False)
        opt.step(_forward_backward(layers, x[idx], y[idx], replace(cfg, dropout=0.0), rng), lr)
        loss = _measure(layers, x[idx], y[idx])[1]
        smooth = 0.9 * smooth + 0.1 * loss
        value = smooth / (1 - 0.9 ** (i + 1))  # bias-corrected moving average
        losses.append(value)
        best = min(best, value)
        if not np.isfinite(value) or value > 4 * best:
            break
    losses_arr = np.array(losses)
    rates = rates[:len(losses_arr)]
    slope = np.gradient(losses_arr, np.log(rates)) if len(losses_arr) > 2 else np.zeros(1)
    cut = max(1, int(np.argmin(losses_arr)))  # only where the loss is still falling
    return LrSweep(rates, losses_arr, float(rates[int(np.argmin(slope[:cut]))]), len(y),
                   int(np.bincount(y, minlength=n_classes).min()))


PLOT_SOFTWARE = "retrain lr-find"  # the PNG's Software tag: an earlier loss curve may be replaced, nothing else


def plot_destination(plot: str, inputs: Iterable[str | None]) -> Path:
    """--plot as the PNG the curve is written to (a name without a suffix gets .png), checked before the sweep:
    not a folder, a device or among the photos, a PNG, and replacing only an earlier loss curve."""
    path = Path(plot)
    if not path.suffix and not path.exists():
        path = path.with_suffix(".png")  # as matplotlib would name it
    check_output_file(path, "--plot", inputs, "lr_find.png")
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the loss curve is written as a PNG: give a name ending in .png")
    if path.is_file() and path.stat().st_size and not _loss_curve(path):
        raise UserError(f"--plot {path} already exists and is not a loss curve retrain drew: give another name")
    return path


def _loss_curve(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == PLOT_SOFTWARE
    except (OSError, ValueError):
        return False


def plot_sweep(sweep: LrSweep, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(sweep.rates, sweep.losses)
    ax.axvline(sweep.suggestion, color="r", ls="--", label=f"suggested {sweep.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
