"""TensorBoard summaries, like retrain.py's --summaries_dir: one scalar per metric per step."""
from __future__ import annotations

from pathlib import Path

from .metrics import RunMetrics


def write_summaries(folder: str | Path, metrics: RunMetrics) -> Path:
    """Write the head's per-step and fine-tuning's per-epoch history as TensorBoard event files."""
    from tensorboardX import SummaryWriter

    folder = Path(folder)
    for run, history, key in (("head", metrics.head.history if metrics.head else [], "step"),
                              ("finetune", metrics.finetune.history if metrics.finetune else [], "epoch")):
        if not history:
            continue
        with SummaryWriter(str(folder / run)) as writer:
            for entry in history:
                for name, value in entry.items():
                    if name != key and isinstance(value, (int, float)):
                        split, _, metric = name.partition("_")
                        writer.add_scalar(f"{metric or split}/{split if metric else 'value'}", value, entry[key])
    return folder
