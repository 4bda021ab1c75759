"""Train the classification head on cached features: softmax, optionally one hidden layer.

The head sees raw backbone features: standardising them cost 1-2 points of accuracy on
hymenoptera in our measurements, so the exported head is plain MatMul/Add layers.
Early stopping keeps the weights with the best validation accuracy (lower loss breaks ties).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class HeadConfig:
    steps: int = 4000  # most optimisation steps; early stopping usually ends sooner
    learning_rate: float = 0.003
    batch_size: int = 100
    hidden_units: int = 0  # 0: a single softmax layer
    dropout: float = 0.2  # before the hidden layer's output layer only
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    eval_interval: int = 50  # steps between validation checks (and progress lines)
    patience: int = 20  # validation checks without improvement before stopping
    seed: int = 0


@dataclass
class HeadResult:
    layers: list[tuple[np.ndarray, np.ndarray]]  # [(W (in, out), b (out,)), ...]
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    steps_run: int = 0


def _network(dim: int, n_classes: int, cfg: HeadConfig):
    import torch.nn as nn

    if cfg.hidden_units:
        return nn.Sequential(nn.Linear(dim, cfg.hidden_units), nn.ReLU(), nn.Dropout(cfg.dropout),
                             nn.Linear(cfg.hidden_units, n_classes))
    return nn.Sequential(nn.Linear(dim, n_classes))


def _layers(net) -> list[tuple[np.ndarray, np.ndarray]]:
    """The dense layers as numpy (W (in, out), b (out,)) pairs."""
    import torch.nn as nn

    return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
            for m in net if isinstance(m, nn.Linear)]


def logits(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The exported head's dense layers in numpy: raw features (N, D) -> logits (N, C)."""
    h = x.astype(np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """What the exported model computes after the backbone: (N, D) features -> (N, C) probabilities."""
    return softmax(logits(layers, x), temperature)


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               n_classes: int, cfg: HeadConfig, log: Callable[[str], None] = print,
               progress: Callable[[int], None] | None = None) -> HeadResult:
    """Mini-batch AdamW with cosine decay; deterministic for a given cfg.seed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of ~100 x 1280: thread hand-offs cost more than they save
    try:
        return _train_head(x_train, y_train, x_val, y_val, n_classes, cfg, log, progress)
    finally:
        torch.set_num_threads(threads)


def _train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                n_classes: int, cfg: HeadConfig, log: Callable[[str], None],
                progress: Callable[[int], None] | None) -> HeadResult:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    xt = torch.from_numpy(x_train.astype(np.float32))
    yt = torch.from_numpy(y_train.astype(np.int64))
    xv = torch.from_numpy(x_val.astype(np.float32)) if len(x_val) else None
    yv = torch.from_numpy(y_val.astype(np.int64)) if len(y_val) else None

    net = _network(x_train.shape[1], n_classes, cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
    batch = min(cfg.batch_size, len(xt))

    def measure(x, y) -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            logits = net(x)
            loss = F.cross_entropy(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
        net.train()
        return acc, loss

    result = HeadResult(layers=_layers(net))
    best_key, best_state, stale, order, pos = None, None, 0, rng.permutation(len(xt)), 0
    net.train()
    for step in range(1, cfg.steps + 1):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(xt)), 0
        idx = torch.from_numpy(order[pos:pos + batch])
        pos += batch
        loss = F.cross_entropy(net(xt[idx]), yt[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(1)
        if step % cfg.eval_interval and step != cfg.steps:
            continue
        train_acc, train_loss = measure(xt, yt)
        entry = {"step": step, "train_accuracy": train_acc, "train_loss": train_loss}
        line = f"Step {step}: Train accuracy = {100 * train_acc:.1f}%, cross entropy = {train_loss:.4f}"
        if xv is not None:
            val_acc, val_loss = measure(xv, yv)
            entry |= {"validation_accuracy": val_acc, "validation_loss": val_loss}
            line += f"; Validation accuracy = {100 * val_acc:.1f}% (N={len(xv)})"
            key = (val_acc, -val_loss)
        else:
            key = (train_acc, -train_loss)
        result.history.append(entry)
        log(line)
        if best_key is None or key > best_key:
            best_key, stale, result.best_step = key, 0, step
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
        result.steps_run = step
        if stale >= cfg.patience:
            log(f"Early stop at step {step}: no validation improvement since step {result.best_step}.")
            break
    net.load_state_dict(best_state)
    net.eval()
    result.layers = _layers(net)
    return result
