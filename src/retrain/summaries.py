"""TensorBoard summaries, like retrain.py's --summaries_dir: one scalar per metric per step."""
from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from .metrics import RunMetrics


def write_summaries(folder: str | Path, metrics: RunMetrics) -> Path:
    """The head's per-step and fine-tuning's per-epoch history as TensorBoard event files; the run's folder.

    Each run gets its own folder under `folder`, named by its time, so that runs sharing a
    --summaries_dir show apart in TensorBoard (retrain.py emptied the folder instead); it is
    written aside and renamed into place when complete, so an interrupted run leaves no half run.
    """
    from tensorboardX import SummaryWriter

    folder = Path(folder)
    name = datetime.now().strftime("%Y%m%d-%H%M%S")
    staging = folder / f".{name}-{os.getpid()}.partial"
    staging.mkdir(parents=True)
    try:
        for run, history, key in (("head", metrics.head.history if metrics.head else [], "step"),
                                  ("finetune", metrics.finetune.history if metrics.finetune else [], "epoch")):
            if not history:
                continue
            with SummaryWriter(str(staging / run)) as writer:
                for entry in history:
                    for metric_name, value in entry.items():
                        if metric_name != key and isinstance(value, (int, float)):
                            split, _, metric = metric_name.partition("_")
                            writer.add_scalar(f"{metric or split}/{split if metric else 'value'}", value, entry[key])
        return _rename_into_place(staging, folder, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _rename_into_place(staging: Path, folder: Path, name: str) -> Path:
    """`staging` renamed to folder/name, or name-2, name-3... where another run of the same second has it."""
    for n in range(1, 1000):
        run = folder / (name if n == 1 else f"{name}-{n}")
        if not run.exists():
            try:
                staging.rename(run)
                return run
            except OSError:  # taken between the check and the rename: the next name
                continue
    raise FileExistsError(f"no free run name under {folder}")
