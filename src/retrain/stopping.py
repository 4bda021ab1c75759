"""Early stopping, shared by the head (checks every few steps) and live-image training (every epoch).

A check's key is a tuple compared in order, e.g. (validation accuracy, -validation loss): a
higher key is better, so accuracy decides and a lower loss breaks ties.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    patience: int | None  # checks without improvement before stopping; None: never stop early
    best: tuple | None = None
    stale: int = 0  # checks since the best one

    def improved(self, key: tuple) -> bool:
        """Record a check; True when it is the best so far (the caller keeps those weights)."""
        if self.best is None or key > self.best:
            self.best, self.stale = key, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience
